"""The evaluation stage: options, shard-set choice, the results file, baselines' crops, and end to end
on the toy dataset with the tiny backbones and a tiny head."""

import json

import numpy as np
import pytest

from regionspot.errors import RegionSpotError
from regionspot.evaluate.baselines import crop_region
from regionspot.evaluate.config import EvalConfig
from regionspot.evaluate.detections import Detections
from regionspot.evaluate.metrics import to_results

# --- options -----------------------------------------------------------------------------------------


def test_config_collects_every_problem(tmp_path):
    cfg = EvalConfig(method="clip", evaluator="slow", max_dets=0, proposals=str(tmp_path / "none.json"))
    with pytest.raises(RegionSpotError) as e:
        cfg.check()
    msg = str(e.value)
    for part in ("--method 'clip'", "--evaluator 'slow'", "--max-dets 0", "--proposals"):
        assert part in msg
    with pytest.raises(RegionSpotError, match="--checkpoint is required"):
        EvalConfig().check()
    EvalConfig(method="clip-crop").check()  # baselines need no checkpoint


def test_output_dir_sits_beside_the_run(tmp_path):
    step = tmp_path / "runs" / "bl" / "checkpoints" / "step-0000100"
    step.mkdir(parents=True)
    cfg = EvalConfig(checkpoint=step, dataset="toy_val")
    assert cfg.output_dir() == tmp_path / "runs" / "bl" / "eval" / "step-0000100-toy_val-gt"
    assert EvalConfig(checkpoint=step, out=tmp_path / "x").output_dir() == tmp_path / "x"
    (step.parent / "last").write_text("step-0000100\n")  # the newest step, named in a text file
    for ckpt in (step.parent / "last", tmp_path / "runs" / "bl"):
        assert (
            EvalConfig(checkpoint=ckpt).output_dir()
            == tmp_path / "runs" / "bl" / "eval" / "step-0000100-lvis_val-gt"
        )


# --- the results file ----------------------------------------------------------------------------------


def test_detections_file_reads_back_as_the_columns(tmp_path):
    dets = Detections([10, 20, 30], with_masks=True)
    boxes = np.array([[1.234567, 2.0, 11.5, 22.25], [0.0, 0.0, 3.0, 4.0]], np.float32)
    rle = {"size": [5, 5], "counts": b"05000"}
    dets.add(7, boxes, np.array([2, 0]), np.array([0.123456789, 0.5], np.float32), masks=[rle, rle])
    dets.add(8, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))
    dets.write_json(tmp_path / "d.json")
    written = json.loads((tmp_path / "d.json").read_text())
    assert written == to_results(dets.columns())
    assert written[0]["category_id"] == 30 and written[0]["bbox"] == [1.23, 2.0, 10.27, 20.25]
    assert written[0]["segmentation"] == {"size": [5, 5], "counts": "05000"}
    assert dets.images == 2 and len(dets) == 2
    empty = Detections([1])
    empty.write_json(tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text()) == []


def test_crop_region_covers_the_box_and_paints_outside_the_mask():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    crop = crop_region(image, np.array([2.5, 1.2, 6.0, 4.0]))
    np.testing.assert_array_equal(crop, image[1:4, 2:6])
    mask = np.zeros((10, 12), bool)
    mask[2, 3] = True
    painted = crop_region(image, np.array([2.5, 1.2, 6.0, 4.0]), mask, fill=[1, 2, 3])
    np.testing.assert_array_equal(painted[1, 1], image[2, 3])
    np.testing.assert_array_equal(painted[0, 0], [1, 2, 3])
    assert crop_region(image, np.array([11.9, 9.9, 12.0, 10.0])).shape == (1, 1, 3)  # never empty


# --- end to end: toy_val, tiny backbones, a tiny head --------------------------------------------------

VAL_IMAGES = 12


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory):
    """A data root with a 12-image toy_val split (so a shard set covers the whole annotation file)."""
    from regionspot.data.toy import ensure_toy

    root = tmp_path_factory.mktemp("toy_val_root")
    annotations, _ = ensure_toy(root, "val", num_images=VAL_IMAGES)
    return root, annotations


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    """A randomly initialised one-layer head for the tiny backbones, saved as a checkpoint dir."""
    from regionspot.models.checkpoint import save_head
    from regionspot.models.head import RegionSpotHead
    from regionspot.models.presets import load_backbones, resolve_backbones

    backbones = load_backbones(resolve_backbones("tiny"))
    clip = backbones.clip
    head = RegionSpotHead(clip.width, clip.embed_dim, num_layers=1, ff_dim=64, logit_scale=clip.logit_scale)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step-0000001"
    path.mkdir(parents=True)
    save_head(head, path, backbones.fingerprint)
    return path, backbones.fingerprint


def _cfg(toy_val, tiny_head, tmp_path, **kw):
    base = dict(checkpoint=tiny_head[0], dataset="toy_val", data_root=toy_val[0], shards_root=tmp_path / "shards",
                backbones="tiny", gpus=0, out=tmp_path / "out", batch_size=5)  # fmt: skip
    return EvalConfig(**{**base, **kw})


def _lvis_api(annotations, detections_json):
    from lvis import LVIS, LVISEval, LVISResults

    from regionspot.evaluate.metrics import _lvis_numpy_shim

    _lvis_numpy_shim()
    gt = LVIS(str(annotations))
    ev = LVISEval(gt, LVISResults(gt, str(detections_json)), "bbox")
    ev.run()
    return {k: (None if v < 0 else float(v)) for k, v in ev.get_results().items()}


@pytest.fixture(scope="module")
def first_eval(toy_val, tiny_head, tmp_path_factory):
    """The first evaluation with GT boxes: it extracts the shard set, which later evaluations reuse."""
    from regionspot.evaluate.runner import run_eval

    tmp = tmp_path_factory.mktemp("first")
    return run_eval(_cfg(toy_val, tiny_head, tmp, evaluator="lvis"), show=False), tmp


def test_eval_metrics_equal_the_lvis_api_on_the_written_file(toy_val, tiny_head, first_eval):
    from regionspot.evaluate.runner import run_eval

    first, tmp_path = first_eval
    assert first.shards_source == "extracted" and first.images == VAL_IMAGES
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["bbox"] == first.metrics["bbox"] and written["info"]["images"] == VAL_IMAGES
    assert written["bbox"] == _lvis_api(toy_val[1], tmp_path / "out" / "detections.json")
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert dets and {"image_id", "category_id", "bbox", "score"} == set(dets[0])
    assert all(0 < d["score"] <= 1 for d in dets)
    assert (tmp_path / "out" / "config.yaml").is_file()
    # The next checkpoint (here: the same) finds the kept shard set and costs only the head.
    second = run_eval(_cfg(toy_val, tiny_head, tmp_path, evaluator="fast", out=tmp_path / "out2"), show=False)
    assert second.shards_source == "found" and second.shards == first.shards
    assert (tmp_path / "out2" / "detections.json").read_text() == (
        tmp_path / "out" / "detections.json"
    ).read_text()
    for k, v in first.metrics["bbox"].items():
        assert (v is None and second.metrics["bbox"][k] is None) or abs(v - second.metrics["bbox"][k]) < 1e-4


def _proposals(annotations, images=8):
    """Jittered GT boxes (multiples of 1/4 px, exact in both formats) of the first `images` images, in the
    COCO results format (each box twice, with two classes and scores) and the official dict."""
    gt = json.loads(annotations.read_text())
    ids = sorted(i["id"] for i in gt["images"])[:images]
    rng = np.random.default_rng(0)
    results, official = [], {}
    for a in gt["annotations"]:
        if a["image_id"] not in ids:
            continue
        x, y, w, h = (np.round(np.asarray(a["bbox"]) * 4 + rng.integers(-4, 5, 4)) / 4).tolist()
        w, h = max(w, 2.0), max(h, 2.0)
        score = float(rng.integers(20, 100)) / 100
        results += [{"image_id": a["image_id"], "category_id": 1, "bbox": [x, y, w, h], "score": score / 2},
                    {"image_id": a["image_id"], "category_id": 2, "bbox": [x, y, w, h], "score": score}]  # fmt: skip
        entry = official.setdefault(str(a["image_id"]), {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(score)
        entry["labels"].append(0)
    return results, official, ids


def test_both_proposal_formats_give_identical_detections(toy_val, tiny_head, tmp_path):
    from regionspot.evaluate.runner import run_eval

    results, official, ids = _proposals(toy_val[1])
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "official.json").write_text(json.dumps(official))
    outs = []
    for name in ("results", "official"):
        out = tmp_path / f"out-{name}"
        res = run_eval(
            _cfg(toy_val, tiny_head, tmp_path, proposals=str(tmp_path / f"{name}.json"), out=out), show=False
        )
        assert res.shards_source == "extracted"
        outs.append((out / "detections.json").read_text())
    assert outs[0] == outs[1]
    dets = json.loads(outs[0])
    assert {d["image_id"] for d in dets} <= set(ids)  # images without proposals get no detections
    best = {}  # boxes beyond the image were clipped, so compare per image: score <= best proposal score
    for r in results:
        best[r["image_id"]] = max(best.get(r["image_id"], 0), r["score"])
    assert all(d["score"] <= best[d["image_id"]] + 1e-6 for d in dets)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"image_id": 1000001, "bbox": [1, 2, 3, 4], "score": 0.5}', "malformed JSON"),
        ('[{"image_id": 1000001, "score": 0.5}]', "no 'bbox'"),
        ('[{"image_id": 42, "bbox": [1, 2, 3, 4], "score": 0.5}]', "not in dataset"),
        ('{"1000001": {"scores": [0.5]}}', "no 'boxes'"),
    ],
)
def test_malformed_proposals_fail_before_any_work(toy_val, tiny_head, tmp_path, content, message):
    from regionspot.evaluate.runner import run_eval

    (tmp_path / "p.json").write_text(content)
    with pytest.raises(RegionSpotError, match=message):
        run_eval(_cfg(toy_val, tiny_head, tmp_path, proposals=str(tmp_path / "p.json")), show=False)
    assert not (tmp_path / "shards").exists() and not (tmp_path / "out").exists()


def test_no_detections_still_writes_both_files(toy_val, tiny_head, tmp_path):
    from regionspot.evaluate.runner import run_eval

    empty = [{"image_id": 1000001, "bbox": [5.0, 5.0, 0.0, 0.0], "score": 0.9}]  # no area: dropped
    (tmp_path / "p.json").write_text(json.dumps(empty))
    res = run_eval(_cfg(toy_val, tiny_head, tmp_path, proposals=str(tmp_path / "p.json")), show=False)
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox"]
    assert metrics["AP"] == 0.0 and metrics == res.metrics["bbox"]


def test_a_checkpoint_of_other_backbones_is_refused(toy_val, tiny_head, first_eval, tmp_path):
    from regionspot.evaluate.runner import run_eval
    from regionspot.models.checkpoint import load_head, save_head

    head, _, _ = load_head(tiny_head[0])
    other = tmp_path / "other"
    other.mkdir()
    save_head(head, other, "0" * 64)
    with pytest.raises(RegionSpotError, match="fingerprint"):
        run_eval(
            _cfg(toy_val, tiny_head, tmp_path, checkpoint=other, shards=first_eval[0].shards), show=False
        )


def test_clip_baselines_and_masks(toy_val, tiny_head, first_eval, tmp_path):
    from regionspot.evaluate.runner import run_eval

    gt_shards = first_eval[0].shards
    crop = run_eval(_cfg(toy_val, tiny_head, tmp_path, method="clip-crop", checkpoint=None, shards=gt_shards),
                    show=False)  # fmt: skip
    assert set(crop.metrics) == {"bbox"} and crop.metrics["bbox"]["AP"] is not None
    with pytest.raises(RegionSpotError, match="--masks"):
        run_eval(_cfg(toy_val, tiny_head, tmp_path, method="clip-mask", shards=crop.shards), show=False)
    masked = run_eval(_cfg(toy_val, tiny_head, tmp_path, method="clip-mask", masks=True, out=tmp_path / "m"),
                      show=False)  # fmt: skip
    assert masked.shards_source == "extracted" and set(masked.metrics) == {"bbox", "segm"}
    head = run_eval(_cfg(toy_val, tiny_head, tmp_path, masks=True, out=tmp_path / "h"), show=False)
    assert head.shards == masked.shards and head.shards_source == "found"
    assert all("segmentation" in d for d in json.loads((tmp_path / "h" / "detections.json").read_text()))


def test_cli_eval(toy_val, tiny_head, first_eval, tmp_path):
    from typer.testing import CliRunner

    from regionspot.cli import app

    args = ["eval", "--checkpoint", str(tiny_head[0]), "--dataset", "toy_val", "--data-root", str(toy_val[0]),
            "--shards-root", str(first_eval[1] / "shards"), "--backbones", "tiny", "--evaluator", "fast",
            "--out", str(tmp_path / "cli"), "--max-dets", "5"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "APr" in result.output and "found" in result.output and (tmp_path / "cli" / "metrics.json").is_file()
    )
    dets = json.loads((tmp_path / "cli" / "detections.json").read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) == 5
    bad = CliRunner().invoke(app, ["eval", "--method", "clip", "--checkpoint", str(tiny_head[0])],
                             env={"COLUMNS": "200"})  # fmt: skip
    # refused by typer before anything runs; EvalConfig.check names "--method 'clip'" (test above)
    assert bad.exit_code == 2 and "'clip' is not one of 'regionspot', 'clip-crop', 'clip-mask'" in bad.output


def test_coco_format_annotations_use_cocoeval(toy_val, tiny_head, tmp_path):
    from regionspot.evaluate.runner import run_eval

    gt = json.loads(toy_val[1].read_text())
    for image in gt["images"]:
        image.pop("neg_category_ids", None), image.pop("not_exhaustive_category_ids", None)
    for cat in gt["categories"]:
        cat.pop("frequency", None)
    for ann in gt["annotations"]:
        ann["iscrowd"] = 0
    (tmp_path / "coco.json").write_text(json.dumps(gt))
    spec = f"coco:{tmp_path / 'coco.json'}:{toy_val[1].parent.parent / 'images' / 'val'}"
    res = run_eval(_cfg(toy_val, tiny_head, tmp_path, dataset=spec, evaluator="lvis"), show=False)
    assert list(res.metrics["bbox"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100",
                                         "ARs@100", "ARm@100", "ARl@100"]  # fmt: skip
    fast = run_eval(
        _cfg(toy_val, tiny_head, tmp_path, dataset=spec, evaluator="fast", out=tmp_path / "f"), show=False
    )
    assert fast.shards_source == "found"
    for k, v in res.metrics["bbox"].items():
        assert (v is None and fast.metrics["bbox"][k] is None) or abs(v - fast.metrics["bbox"][k]) < 1e-4


def test_three_tokens_per_region(toy_val, tiny_head, tmp_path):
    """--sam-tokens 3: the head scores each multimask token; a region takes the one SAM rates best."""
    from regionspot.evaluate.runner import run_eval
    from regionspot.models.checkpoint import load_head, save_head
    from regionspot.models.presets import load_backbones, resolve_backbones
    from regionspot.shards.shardset import ShardSet

    head, _, _ = load_head(tiny_head[0])
    save_head(head, tmp_path / "t3", load_backbones(resolve_backbones("tiny", sam_tokens=3)).fingerprint)
    res = run_eval(_cfg(toy_val, tiny_head, tmp_path, checkpoint=tmp_path / "t3", sam_tokens=3), show=False)
    assert res.shards_source == "extracted" and res.detections > 0
    assert ShardSet(res.shards).manifest["backbones"]["sam"]["tokens"] == 3
