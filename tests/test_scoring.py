"""Scoring: token choice, softmax, and the official candidates-by-probability / max-dets-by-score order."""

import pytest
import torch

from regionspot.models.scoring import best_token_logits, region_probabilities, select_detections, topk_labels

# Three regions, three classes. Region 1 is a weak proposal with a confident class; region 2 a
# strong proposal with a middling class. Ranking by probability and by score disagree.
PROBS = torch.tensor(
    [
        [0.5, 0.3, 0.2],  # region 0, proposal score 1.0 -> scores 0.5, 0.3, 0.2
        [0.9, 0.05, 0.05],  # region 1, proposal score 0.2 -> scores 0.18, 0.01, 0.01
        [0.1, 0.6, 0.3],  # region 2, proposal score 0.9 -> scores 0.09, 0.54, 0.27
    ]
)
PROPOSAL_SCORES = torch.tensor([1.0, 0.2, 0.9])


def _pairs(region, cls, scores):
    return [(int(r), int(c), round(float(s), 6)) for r, c, s in zip(region, cls, scores, strict=True)]


def test_candidates_by_probability_then_max_dets_by_score():
    # Candidates by probability: (1,0) 0.9, (2,1) 0.6, (0,0) 0.5. Their scores: 0.18, 0.54, 0.5.
    out = select_detections(PROBS, PROPOSAL_SCORES, candidates=3, max_dets=3)
    assert _pairs(*out) == [(2, 1, 0.54), (0, 0, 0.5), (1, 0, 0.18)]
    # Ranking every pair by score alone would give (0,1) 0.3 third instead of (1,0) 0.18.
    out_all = select_detections(PROBS, PROPOSAL_SCORES, candidates=9, max_dets=3)
    assert _pairs(*out_all) == [(2, 1, 0.54), (0, 0, 0.5), (0, 1, 0.3)]


def test_max_dets_keeps_the_best_scores_not_the_best_probabilities():
    out = select_detections(PROBS, PROPOSAL_SCORES, candidates=3, max_dets=2)
    # (1,0) has the highest probability (0.9) but the lowest score: max-dets drops it.
    assert _pairs(*out) == [(2, 1, 0.54), (0, 0, 0.5)]


def test_gt_boxes_score_is_the_probability():
    region, cls, scores = select_detections(PROBS, torch.ones(3), candidates=4, max_dets=4)
    assert torch.allclose(scores, PROBS[region, cls])
    assert _pairs(region, cls, scores) == [(1, 0, 0.9), (2, 1, 0.6), (0, 0, 0.5), (0, 1, 0.3)]


def test_sizes_and_empty_image():
    region, cls, scores = select_detections(PROBS, PROPOSAL_SCORES, candidates=900, max_dets=300)
    assert len(region) == len(cls) == len(scores) == 9  # min(max_dets, candidates, N*K)
    assert torch.all(scores[:-1] >= scores[1:])
    region, cls, scores = select_detections(torch.zeros(0, 5), torch.zeros(0))
    assert region.shape == cls.shape == scores.shape == (0,)
    assert region.dtype == cls.dtype == torch.int64 and scores.dtype == torch.float32


def test_ties_are_ordered_by_region_then_class():
    probs = torch.full((3, 2), 0.5)
    region, cls, _ = select_detections(probs, torch.ones(3), candidates=4, max_dets=4)
    assert list(zip(region.tolist(), cls.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        select_detections(PROBS, torch.ones(2))


def test_best_token_logits():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    iou = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.7]])  # region 1 ties: first token wins
    out = best_token_logits(logits, iou)
    assert torch.equal(out, torch.stack([logits[0, 1], logits[1, 0]]))
    assert torch.equal(best_token_logits(logits[:, :1], iou[:, :1]), logits[:, 0])
    batched = best_token_logits(logits[None].expand(2, -1, -1, -1), iou[None].expand(2, -1, -1))
    assert batched.shape == (2, 2, 4) and torch.equal(batched[1], out)


def test_region_probabilities():
    logits = torch.randn(4, 3, 7)
    iou = torch.rand(4, 3)
    probs = region_probabilities(logits, iou)
    assert probs.shape == (4, 7) and torch.allclose(probs.sum(-1), torch.ones(4))
    assert torch.allclose(probs, torch.softmax(best_token_logits(logits, iou), -1))
    assert torch.allclose(region_probabilities(logits[:, 0]), torch.softmax(logits[:, 0], -1))
    with pytest.raises(ValueError):
        region_probabilities(logits)


def test_topk_labels():
    scores, idx = topk_labels(PROBS, 2)
    assert idx.tolist() == [[0, 1], [0, 1], [1, 2]]
    assert torch.allclose(scores[:, 0], PROBS.max(-1).values)
    assert topk_labels(PROBS, 10)[1].shape == (3, 3)
