"""The fusion head and its checkpoints: shapes, padding, multimask tokens, official import, round trips."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import (
    convert_official,
    head_file_metadata,
    load_head,
    read_official_head,
    resolve_checkpoint,
    save_head,
    write_last,
)
from regionspot.models.head import RegionSpotHead

C, D = 64, 32


def _inputs(b=2, n=5, t=None, length=9, k=7):
    tokens = torch.randn(b, n, 256) if t is None else torch.randn(b, n, t, 256)
    text = F.normalize(torch.randn(k, D), dim=-1)
    return tokens, torch.randn(b, length, C), text


def _head(**kw):
    return RegionSpotHead(C, D, ff_dim=128, **kw).eval()


def test_shapes_for_one_and_three_tokens_and_no_regions():
    head = _head()
    tokens, clip_map, text = _inputs()
    assert head(tokens, clip_map, text).shape == (2, 5, 7)
    tokens3, _, _ = _inputs(t=3)
    assert head(tokens3, clip_map, text).shape == (2, 5, 3, 7)
    assert head(torch.zeros(2, 0, 256), clip_map, text).shape == (2, 0, 7)
    assert head(torch.zeros(2, 0, 3, 256), clip_map, text, torch.zeros(2, 0, dtype=torch.bool)).shape == (
        2,
        0,
        3,
        7,
    )
    emb, attention = head.embed(tokens, clip_map, return_attention=True)
    assert emb.shape == (2, 5, D) and attention.shape == (2, 5, 9)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, head.embed(tokens, clip_map))  # the attention path is the same layer
    emb3, attention3 = head.embed(tokens3, clip_map, return_attention=True)
    assert emb3.shape == (2, 5, 3, D) and attention3.shape == (2, 5, 3, 9)
    empty, empty_attention = head.embed(torch.zeros(1, 0, 256), clip_map[:1], return_attention=True)
    assert empty.shape == (1, 0, D) and empty_attention.shape == (1, 0, 9)
    assert head.logit_scale == 100.0 and head.config()["ff_dim"] == 128


def test_each_of_three_tokens_is_scored_in_its_own_sequence():
    """Token t of every region forms one sequence (the official multimask inference): the result for
    token t equals running the T = 1 head on token t alone."""
    head = _head()
    tokens3, clip_map, text = _inputs(t=3)
    mask = torch.tensor([[True] * 4 + [False], [True] * 5])
    logits = head(tokens3, clip_map, text, mask)
    for t in range(3):
        alone = head(tokens3[:, :, t], clip_map, text, mask)
        torch.testing.assert_close(logits[:, :, t][mask], alone[mask], atol=1e-4, rtol=0)


def test_padding_changes_no_real_region():
    head = _head()
    tokens, clip_map, text = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    padded = head(tokens, clip_map, text, mask)
    alone = head(tokens[:1, :3], clip_map[:1], text)
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(padded[1], head(tokens[1:], clip_map[1:], text)[0], atol=1e-4, rtol=0)
    garbage = tokens.clone()
    garbage[0, 3:] = 1e3
    torch.testing.assert_close(head(garbage, clip_map, text, mask)[0, :3], padded[0, :3], atol=1e-4, rtol=0)
    # an image with no real region beside one with regions: nothing becomes NaN
    none = torch.tensor([[False] * 5, [True] * 5])
    out = head(tokens, clip_map, text, none)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], padded[1], atol=1e-4, rtol=0)


# --- a module mirroring the official code (regionspot/modeling/{decoder,regionspot}.py) ---------------
class _OfficialDecoderLayer(nn.Module):
    """The official TransformerDecoderLayer (DETR style, post-norm, relu)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
            nn.LayerNorm(d_model),
        )
        self.dropout1, self.dropout2, self.dropout3 = (
            nn.Dropout(dropout),
            nn.Dropout(dropout),
            nn.Dropout(dropout),
        )

    def forward(self, tgt, memory):
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, value=tgt)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(query=tgt, key=memory, value=memory)[0]))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt


class _OfficialDecoder(nn.Module):
    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(self, tgt, memory):
        for layer in self.layers:
            tgt = layer(tgt, memory)
        return self.norm(tgt)


class _OfficialRegionSpot(nn.Module):
    """The trained parts of the official RegionSpot module, under the names its checkpoints use."""

    def __init__(self, clip_dim=C, text_dim=D, ff=2048):
        super().__init__()
        self.sam = nn.Linear(4, 4)  # stands in for the frozen SAM the importer skips
        self.clip_model = nn.Linear(4, 4)  # ... and the frozen CLIP
        self.logit_scale = torch.tensor(100.0)  # a plain attribute, not saved (as officially)
        self.to_clip = nn.Linear(256, clip_dim)
        self.ln_clip = nn.LayerNorm(clip_dim, elementwise_affine=False)  # unused
        self.projector = nn.Linear(clip_dim, text_dim)
        self.decoder = _OfficialDecoder(
            _OfficialDecoderLayer(clip_dim, 8, ff, 0.1), 3, nn.LayerNorm(clip_dim)
        )

    def get_logits(self, region_features, text_features, logit_scale):
        region_features = region_features / (region_features.norm(dim=-1, keepdim=True) + 1e-7)
        return logit_scale * region_features @ text_features.unsqueeze(0).transpose(1, 2)

    def forward_inference(self, clip_feat, masks_token, text_feats):
        """As the official `forward_inference`: masks_token [N, T, 256] of one image, clip_feat [1, L, C]."""
        masks_token = masks_token[None, :]
        if masks_token.shape[2] == 1:
            masks_token = masks_token.squeeze(2)
        else:
            masks_token = masks_token.permute(2, 1, 0, 3).squeeze(2)
            clip_feat = clip_feat.repeat(3, 1, 1)
        semantic_token = self.projector(self.decoder(self.to_clip(masks_token), clip_feat))
        logits = self.get_logits(semantic_token, text_feats, self.logit_scale)
        if logits.shape[0] == 3:
            logits = logits.permute(1, 0, 2)
        return logits


class _OfficialWrapper(nn.Module):  # detectron2's META_ARCH wrapper: hence the `model.` prefix
    def __init__(self, **kw):
        super().__init__()
        self.model = _OfficialRegionSpot(**kw)


def _official_checkpoint(tmp_path, name="regionspot_bl.pth", **extra):
    official = _OfficialWrapper(ff=256).eval()
    path = tmp_path / name
    torch.save({"model": official.state_dict(), **extra}, path)
    return official, path


def test_official_checkpoint_gives_the_official_logits(tmp_path):
    official, path = _official_checkpoint(tmp_path, iteration=7)
    head = read_official_head(path).eval()
    assert head.config() == {
        "clip_width": C,
        "embed_dim": D,
        "sam_dim": 256,
        "num_layers": 3,
        "num_heads": 8,
        "ff_dim": 256,
        "dropout": 0.1,
        "logit_scale": 100.0,
    }
    tokens, clip_map, text = _inputs(b=1, n=6, t=1, length=11)
    tokens3 = torch.randn(1, 6, 3, 256)
    with torch.no_grad():
        expected = official.model.forward_inference(clip_map, tokens[0], text)  # [1, N, K]
        torch.testing.assert_close(head(tokens[:, :, 0], clip_map, text), expected, atol=1e-4, rtol=0)
        expected3 = official.model.forward_inference(clip_map, tokens3[0], text)  # [N, 3, K]
        torch.testing.assert_close(head(tokens3, clip_map, text)[0], expected3, atol=1e-4, rtol=0)
    loaded, fingerprint, imported = load_head(path, "abc")
    assert (fingerprint, imported) == ("abc", True)
    out = convert_official(path, tmp_path / "converted")
    again, fingerprint, imported = load_head(out, fingerprint_if_imported="chosen")
    assert (fingerprint, imported) == ("chosen", True)
    assert json.loads(head_file_metadata(out)["source"]) == "regionspot_bl.pth"
    with torch.no_grad():
        torch.testing.assert_close(again(tokens3, clip_map, text), head(tokens3, clip_map, text))


def test_official_checkpoint_with_numpy_trainer_state_loads_and_code_objects_are_refused(tmp_path):
    official, path = _official_checkpoint(tmp_path, trainer={"iter": np.int64(5), "hist": np.zeros(3)})
    head = read_official_head(path)
    torch.testing.assert_close(head.to_clip.weight, official.model.to_clip.weight)
    _official_checkpoint(tmp_path, name="pickled.pth", trainer={"obj": _Unsafe()})
    with pytest.raises(RegionSpotError, match=r"holds Python objects.*_Unsafe.*weights only"):
        load_head(tmp_path / "pickled.pth")


class _Unsafe:
    pass


def test_official_checkpoint_missing_keys_are_named(tmp_path):
    state = _OfficialWrapper(ff=256).state_dict()
    del state["model.decoder.layers.1.linear2.weight"]
    del state["model.decoder.norm.bias"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(RegionSpotError, match=r"2 head weight.*model\.decoder\.layers\.1\.linear2\.weight"):
        read_official_head(tmp_path / "broken.pth")
    torch.save({"model": {"model.backbone.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(RegionSpotError, match="not a RegionSpot checkpoint"):
        load_head(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(RegionSpotError, match="cannot be read"):
        load_head(tmp_path / "text.pth")


def test_checkpoint_round_trip_through_dir_last_and_file(tmp_path):
    head = _head(logit_scale=50.0)
    step = tmp_path / "checkpoints" / "step-0000010"
    save_head(head, step, "fp", {"step": 10})
    save_head(_head(), tmp_path / "checkpoints" / "step-0000005", "fp")
    write_last(tmp_path / "checkpoints", step)
    assert (tmp_path / "checkpoints" / "last").read_text() == "step-0000010\n"
    tokens, clip_map, text = _inputs()
    for path in (
        tmp_path,
        tmp_path / "checkpoints",
        tmp_path / "checkpoints" / "last",
        step,
        step / "head.safetensors",
    ):
        assert resolve_checkpoint(path) == step / "head.safetensors"
        loaded, fingerprint, imported = load_head(path)
        assert (fingerprint, imported, loaded.logit_scale, loaded.training) == ("fp", False, 50.0, False)
        assert loaded.config() == head.config()
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens, clip_map, text), head(tokens, clip_map, text))
    assert json.loads(head_file_metadata(step)["step"]) == 10
    with pytest.raises(RegionSpotError, match="no such file"):
        load_head(tmp_path / "nope")
    (tmp_path / "checkpoints" / "last").write_text("step-0000099\n")
    with pytest.raises(RegionSpotError, match="step-0000099, which is missing"):
        load_head(tmp_path / "checkpoints" / "last")


def test_bf16_autocast_forward_is_finite_and_close():
    head = _head()
    tokens, clip_map, text = _inputs()
    with torch.no_grad():
        exact = head(tokens, clip_map, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = head(tokens, clip_map, text)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert (fast - exact).abs().max() < 5.0  # the decoder runs in bf16; the logits are float32
