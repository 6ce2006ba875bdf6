"""The fusion head and its checkpoints."""

import pytest
import torch
from torch import nn

from regionspot.errors import RegionSpotError
from regionspot.models.checkpoint import convert_official, load_head, save_head, write_last
from regionspot.models.head import RegionSpotHead


def _inputs(b=2, n=5, t=None, length=9, c=64, k=7, d=32):
    tokens = torch.randn(b, n, 256) if t is None else torch.randn(b, n, t, 256)
    text = nn.functional.normalize(torch.randn(k, d), dim=-1)
    return tokens, torch.randn(b, length, c), text


def test_shapes_for_one_and_three_tokens_and_no_regions():
    head = RegionSpotHead(64, 32).eval()
    tokens, clip_map, text = _inputs()
    assert head(tokens, clip_map, text).shape == (2, 5, 7)
    tokens3, _, _ = _inputs(t=3)
    assert head(tokens3, clip_map, text).shape == (2, 5, 3, 7)
    assert head(torch.zeros(2, 0, 256), clip_map, text).shape == (2, 0, 7)
    emb, attention = head.embed(tokens, clip_map, return_attention=True)
    assert emb.shape == (2, 5, 32) and attention.shape == (2, 5, 9)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, head.embed(tokens, clip_map))


def test_padding_changes_no_real_region():
    head = RegionSpotHead(64, 32).eval()
    tokens, clip_map, text = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    padded = head(tokens, clip_map, text, mask)
    alone = head(tokens[:1, :3], clip_map[:1], text)
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-4, rtol=0)
    garbage = tokens.clone()
    garbage[0, 3:] = 1e3
    torch.testing.assert_close(head(garbage, clip_map, text, mask)[0, :3], padded[0, :3], atol=1e-4, rtol=0)


class _OfficialModel(nn.Module):
    """The official RegionSpot module's head parts, under the names its checkpoints use."""

    def __init__(self, c=64, d=32):
        super().__init__()
        self.to_clip = nn.Linear(256, c)
        layer = nn.TransformerDecoderLayer(c, 8, 2048, 0.1, batch_first=True, norm_first=False)
        self.decoder = nn.TransformerDecoder(layer, 3, norm=nn.LayerNorm(c))
        self.projector = nn.Linear(c, d)
        self.ln_clip = nn.LayerNorm(c)  # present in the official checkpoints, unused
        self.sam = nn.Linear(4, 4)  # stands in for the frozen backbones the importer skips
        self.clip_model = nn.Linear(4, 4)

    def logits(self, tokens, clip_map, text):
        x = self.projector(self.decoder(self.to_clip(tokens), clip_map))
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-7)
        return 100.0 * x @ text.t()


class _Official(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _OfficialModel()


def test_official_checkpoint_gives_the_official_logits(tmp_path):
    official = _Official().eval()
    path = tmp_path / "regionspot_bl.pth"
    torch.save({"model": official.state_dict(), "iteration": 7}, path)
    head = RegionSpotHead.from_official_checkpoint(path).eval()
    assert head.config()["clip_width"] == 64 and head.config()["embed_dim"] == 32 and head.logit_scale == 100.0
    tokens, clip_map, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(tokens, clip_map, text), official.model.logits(tokens, clip_map, text),
                                   atol=1e-4, rtol=0)
    loaded, fingerprint, imported = load_head(path, "abc")
    assert (fingerprint, imported) == ("abc", True)
    out = convert_official(path, tmp_path / "converted", "abc")
    again, fingerprint, _ = load_head(out)
    assert fingerprint == "abc"
    torch.testing.assert_close(again(tokens, clip_map, text), head(tokens, clip_map, text))


def test_official_checkpoint_missing_keys_are_named(tmp_path):
    state = _Official().state_dict()
    del state["model.decoder.layers.1.linear2.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(RegionSpotError, match=r"model\.decoder\.layers\.1\.linear2\.weight"):
        RegionSpotHead.from_official_checkpoint(tmp_path / "broken.pth")
    torch.save({"model": {"model.backbone.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(RegionSpotError, match="not a RegionSpot checkpoint"):
        load_head(tmp_path / "other.pth")


def test_checkpoint_round_trip_through_dir_last_and_file(tmp_path):
    head = RegionSpotHead(64, 32, logit_scale=50.0).eval()
    step = tmp_path / "checkpoints" / "step-0000010"
    save_head(head, step, "fp")
    write_last(tmp_path / "checkpoints", step)
    tokens, clip_map, text = _inputs()
    for path in (tmp_path, tmp_path / "checkpoints" / "last", step, step / "head.safetensors"):
        loaded, fingerprint, imported = load_head(path)
        assert (fingerprint, imported, loaded.logit_scale) == ("fp", False, 50.0)
        torch.testing.assert_close(loaded(tokens, clip_map, text), head(tokens, clip_map, text))
    with pytest.raises(RegionSpotError, match="no such file"):
        load_head(tmp_path / "nope")
