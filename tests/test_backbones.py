"""Backbones: SAM region tokens and CLIP maps equal the libraries' own computation for the same weights,
weights load safely from files in the real formats, presets are checked before loading, fingerprints."""

import json
import math
import pickle
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from segment_anything.build_sam import sam_model_registry
from torch import nn

from regionspot.errors import RegionSpotError
from regionspot.models.clip import ClipMapEncoder, is_torchscript, load_clip
from regionspot.models.fingerprint import backbones_fingerprint
from regionspot.models.frozen import CompiledForward, compile_forward, resolve_precision
from regionspot.models.presets import list_presets, load_backbones, resolve_backbones
from regionspot.models.sam import SamRegionEncoder, load_sam
from regionspot.models.tiny import build_tiny_sam

TINY_CONFIG = {  # an open_clip model config as small as tiny CLIP, to load weight files by model name
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
QG, GELU = "regionspot-test-tiny-quickgelu", "regionspot-test-tiny"


def fp16_close(actual, expected):
    """Equal within float16 rounding, as the shards store them."""
    torch.testing.assert_close(actual.half().float(), expected.half().float(), rtol=2e-3, atol=2e-3)


def image(h, w, seed):
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return np.clip(smooth + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny():
    return load_backbones(resolve_backbones("tiny"))


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    """Register open_clip configs of tiny size (QuickGELU and GELU) under test-only names."""
    root = tmp_path_factory.mktemp("open_clip_configs")
    (root / f"{QG}.json").write_text(json.dumps(TINY_CONFIG))
    (root / f"{GELU}.json").write_text(json.dumps({**TINY_CONFIG, "quick_gelu": False}))
    open_clip.add_model_config(root)
    return root


def openai_archive(model: nn.Module, path, image_size=64):
    """Save `model` as OpenAI's releases are: a traced TorchScript archive, weights partly float16,
    the state dict holding input_resolution / context_length / vocab_size and no attn_mask buffer."""
    from open_clip.model import convert_weights_to_fp16

    class Archive(nn.Module):
        def __init__(self, clip):
            super().__init__()
            for name in ("visual", "transformer", "token_embedding", "ln_final"):
                setattr(self, name, getattr(clip, name))
            for name in ("positional_embedding", "text_projection", "logit_scale"):
                setattr(self, name, getattr(clip, name))
            for key, value in {
                "input_resolution": image_size,
                "context_length": 77,
                "vocab_size": 49408,
            }.items():
                self.register_buffer(key, torch.tensor(value))

        def forward(self, image):
            return self.visual(image)

    convert_weights_to_fp16(model)
    example = torch.ones(1, 3, image_size, image_size, dtype=torch.float16)
    torch.jit.save(torch.jit.trace(Archive(model).eval(), example, check_trace=False), str(path))
    return {k: v.float() for k, v in model.state_dict().items()}  # the weights as loaded (float32)


# --- SAM: the library's own computation ---------------------------------------------------------


def library_sam(sam, img, boxes=None, points=None):
    """Tokens, IoU and masks with segment_anything's own modules: SamPredictor embeds the image and runs
    MaskDecoder.forward (IoU, masks); the decoder's transformer is called by hand as predict_masks does.

    The image reaches the library resized by `models.preprocess.sam_resize`, SAM's longest-side resize as
    the encoders do it (within one level of PIL's: tests/test_preprocess.py), so this compares the
    networks, not two resizers.

    Returns: the image embedding [1, 256, h, w] and, for T in (1, 3), (tokens [N, T, 256], iou [N, T],
    the mask SAM rates best [N, H, W] at the original size).
    """
    from regionspot.models.preprocess import sam_resize

    predictor = SamPredictor(sam)
    resized = sam_resize(torch.from_numpy(img).permute(2, 0, 1), sam.image_encoder.img_size)
    predictor.set_torch_image(resized[None].float(), img.shape[:2])
    size = img.shape[:2]
    if boxes is not None:
        boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), size)
        coords = labels = None
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    else:
        coords = predictor.transform.apply_coords_torch(torch.as_tensor(points, dtype=torch.float32), size)[
            :, None
        ]
        labels = torch.ones(coords.shape[:2], dtype=torch.int)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    dec, n = sam.mask_decoder, len(sparse)
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).unsqueeze(0).expand(n, -1, -1)
    src = torch.repeat_interleave(predictor.features, n, dim=0) + dense
    pos = torch.repeat_interleave(sam.prompt_encoder.get_dense_pe(), n, dim=0)
    out = {}
    with torch.no_grad():
        hs, _ = dec.transformer(src, pos, torch.cat([output_tokens, sparse], dim=1))
        for tokens, token in ((1, hs[:, 1:2]), (3, hs[:, 2:5])):  # mask token 0; the three multimask tokens
            masks, iou, _ = predictor.predict_torch(coords, labels, boxes=boxes, multimask_output=tokens == 3)
            out[tokens] = token, iou, masks[torch.arange(n), iou.argmax(1)]
    return predictor.features, out


def assert_masks_match(rles, expected, size):
    assert all(r["size"] == list(size) and isinstance(r["counts"], str) for r in rles)
    decoded = np.stack([mask_utils.decode({**r, "counts": r["counts"].encode()}) for r in rles])
    assert decoded.shape == expected.shape
    assert (decoded != expected.numpy()).mean() < 1e-3  # bilinear upsampling: a rare pixel at the threshold


@pytest.mark.parametrize("tokens", [1, 3])
def test_tiny_sam_tokens_equal_the_library_decoder(tiny, tokens):
    sam = build_tiny_sam()  # the same weights, segment_anything's own modules throughout
    encoder = SamRegionEncoder(tiny.sam.sam, tokens=tokens)  # image encoder on the fast attention path
    imgs = [image(120, 200, 1), image(64, 64, 2), image(180, 90, 3)]
    boxes = [
        np.array([[10, 10, 100, 80], [0, 0, 200, 120], [150, 30, 199, 119.5]], np.float32),
        np.zeros((0, 4), np.float32),  # an image without regions
        np.array([[5, 20, 60, 170], [30.5, 40, 88, 100]], np.float32),
    ]
    sizes = [im.shape[:2] for im in imgs]
    embeddings = encoder.encode(encoder.prepare(imgs))
    assert embeddings.shape == (3, 256, 16, 16) and embeddings.dtype == torch.float32
    # chunk=2 makes decoder calls that straddle images
    out = encoder.region_tokens(embeddings, [torch.from_numpy(b) for b in boxes], sizes, masks=True, chunk=2)
    assert [len(r.tokens) for r in out] == [3, 0, 2] and out[1].masks == []
    for i in (0, 2):
        features, library = library_sam(sam, imgs[i], boxes=boxes[i])
        token, iou, best = library[tokens]
        fp16_close(embeddings[i : i + 1], features)
        assert out[i].tokens.shape == (len(boxes[i]), tokens, 256) and out[i].tokens.dtype == torch.float32
        fp16_close(out[i].tokens, token)
        fp16_close(out[i].iou, iou)
        assert_masks_match(out[i].masks, best, sizes[i])  # (8) RLE of the original image size
    assert encoder.region_tokens(embeddings, [torch.from_numpy(boxes[0])], sizes[:1])[0].masks is None


def test_point_tokens_are_the_multimask_tokens(tiny):
    img = image(150, 100, 4)
    points = np.array([[20, 30], [80.5, 140]], np.float32)
    embeddings = tiny.sam.encode(tiny.sam.prepare([img]))
    out = tiny.sam.point_tokens(embeddings, [torch.from_numpy(points)], [img.shape[:2]], masks=True)[0]
    token, iou, best = library_sam(build_tiny_sam(), img, points=points)[1][3]
    assert out.tokens.shape == (2, 3, 256)
    fp16_close(out.tokens, token)
    fp16_close(out.iou, iou)
    assert_masks_match(out.masks, best, img.shape[:2])


def test_sam_prepare_resizes_the_longest_side(tiny):
    from regionspot.models.preprocess import sam_resize

    resized = sam_resize(torch.from_numpy(image(100, 300, 5)).permute(2, 0, 1), tiny.sam.img_size)
    assert resized.dtype == torch.uint8 and resized.shape == (3, 85, 256)
    prepared = tiny.sam.prepare([image(100, 300, 5)])
    assert prepared.shape == (1, 3, 256, 256) and (prepared[0, :, 85:] == 0).all()  # padded at the bottom


def test_automatic_boxes_are_xyxy_in_the_image(tiny):
    img = image(96, 128, 6)
    boxes = tiny.sam.automatic_boxes(img, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()


@pytest.mark.slow
def test_vit_b_checkpoint_tokens_equal_the_library_decoder(tmp_path):
    """SAM vit_b-shaped random weights in a .pth, loaded through --sam-checkpoint (one image: ~20 s per encode)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = sam_model_registry["vit_b"](checkpoint=None).eval()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)
    spec = resolve_backbones("tiny", sam="vit_b", sam_checkpoint=path)
    backbones = load_backbones(spec)
    assert backbones.info()["sam"] == {"model": "vit_b", "weights_sha256": backbones.sam_sha256, "tokens": 1}
    img = image(200, 300, 8)
    boxes = np.array([[10, 20, 150, 180], [100, 0, 299, 199]], np.float32)
    embeddings = backbones.sam.encode(backbones.sam.prepare([img]))
    features, library = library_sam(reference, img, boxes=boxes)
    fp16_close(embeddings, features)
    for tokens in (1, 3):
        encoder = SamRegionEncoder(backbones.sam.sam, tokens=tokens)
        out = encoder.region_tokens(embeddings, [torch.from_numpy(boxes)], [img.shape[:2]], masks=True)[0]
        token, iou, best = library[tokens]
        fp16_close(out.tokens, token)
        fp16_close(out.iou, iou)
        assert_masks_match(out.masks, best, img.shape[:2])


# --- CLIP: open_clip's own visual transformer ---------------------------------------------------


def library_map(model, images):
    """The input of ln_post in open_clip's own encode_image: the transformer's full token sequence."""
    seen = []
    handle = model.visual.ln_post.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    return seen[0]


def test_tiny_clip_map_equals_open_clip_before_ln_post(tiny):
    clip = tiny.clip
    imgs = [image(120, 200, 9), image(64, 48, 10)]
    prepared = clip.prepare(imgs)
    for im, x in zip(imgs, prepared, strict=True):  # squashed to S x S (no crop), bilinear, no antialias
        torch.testing.assert_close(x, reference_clip_input(im, clip, antialias=False), rtol=1e-5, atol=1e-5)
    fmap = clip.feature_map(prepared)
    assert fmap.shape == (2, clip.num_tokens, clip.width) == (2, 65, 64) and fmap.dtype == torch.float32
    fp16_close(fmap, library_map(clip.model, prepared))
    emb = clip.image_embeddings(prepared)
    torch.testing.assert_close(emb, clip.model.encode_image(prepared, normalize=True))
    assert clip.logit_scale == pytest.approx(100.0, rel=1e-5)


def reference_clip_input(im, clip, antialias: bool):
    """The CLIP input as the official demo computes it: F.interpolate (bilinear) on the [0, 1] image
    (torchvision's resize with the same antialias choice for the option), then CLIP's normalisation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    raw = torch.from_numpy(im).permute(2, 0, 1).float() / 255
    size = [clip.image_size, clip.image_size]
    if antialias:
        resized = TF.resize(raw, size, InterpolationMode.BILINEAR, antialias=True)
    else:
        resized = F.interpolate(raw[None], size=size, mode="bilinear", align_corners=False)[0]
    return TF.normalize(resized, clip._mean, clip._std)


def test_clip_antialias_is_the_option_and_changes_the_fingerprint(tiny):
    antialiased = load_backbones(resolve_backbones("tiny", clip_antialias=True))
    img = image(120, 200, 9)
    x = antialiased.clip.prepare([img])[0]
    torch.testing.assert_close(
        x, reference_clip_input(img, antialiased.clip, antialias=True), rtol=1e-5, atol=1e-5
    )
    assert (x - tiny.clip.prepare([img])[0]).abs().max() > 0.05  # a 120 x 200 image squashed to 64 x 64
    fp16_close(antialiased.clip.feature_map(x[None]), library_map(antialiased.clip.model, x[None]))
    # the same weights and sizes, other stored features: sets differing only here are never mixed
    assert antialiased.clip_sha256 == tiny.clip_sha256 and antialiased.fingerprint != tiny.fingerprint
    assert backbones_fingerprint("a", "b", 1, 224) != backbones_fingerprint(
        "a", "b", 1, 224, clip_antialias=True
    )
    assert (antialiased.info()["clip"]["antialias"], tiny.info()["clip"]["antialias"]) == (True, False)
    # a uint8 [3, H, W] tensor (e.g. decoded on the device) is prepared where it is, the same way
    tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(antialiased.clip.prepare([tensor])[0], x)
    torch.testing.assert_close(tiny.clip.prepare([tensor]), tiny.clip.prepare([img]))
    with pytest.raises(RegionSpotError, match="--clip-antialias"):
        resolve_backbones("tiny", clip_antialias="yes")


def test_clip_position_embeddings_are_interpolated_bicubic_without_antialias(tiny):
    """Another CLIP size than the trained one: the official resize_pos_embed (bicubic, no antialias)."""
    pos = tiny.clip.model.visual.positional_embedding  # (1 + 8 * 8, 64) at the trained 64 px
    for size, grid in ((96, 12), (48, 6)):  # up and down
        clip = load_backbones(resolve_backbones("tiny", clip_size=size)).clip
        grid_in = pos[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        expected = F.interpolate(grid_in, size=(grid, grid), mode="bicubic", align_corners=False)
        resized = clip.model.visual.positional_embedding
        torch.testing.assert_close(resized[0], pos[0])  # class token kept
        torch.testing.assert_close(resized[1:], expected[0].permute(1, 2, 0).reshape(grid * grid, -1))


@pytest.mark.slow
def test_vit_b16_state_dict_map_equals_open_clip(tmp_path):
    """ViT-B-16-quickgelu random weights as a state-dict file, loaded through --clip-pretrained PATH, run at
    its native 224 px and at 160 px (position embeddings interpolated; the map still open_clip's own)."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        reference = open_clip.create_model("ViT-B-16-quickgelu").eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    backbones = load_backbones(resolve_backbones("bb", sam="tiny", clip_pretrained=path))
    clip = backbones.clip
    assert (clip.image_size, clip.width, clip.embed_dim, clip.num_tokens) == (224, 768, 512, 197)
    torch.testing.assert_close(clip.model.visual.positional_embedding, reference.visual.positional_embedding)
    prepared = clip.prepare([image(240, 320, 12)])
    fp16_close(clip.feature_map(prepared), library_map(reference, prepared))
    assert backbones.info()["clip"]["logit_scale"] == pytest.approx(math.exp(reference.logit_scale.item()))

    spec = resolve_backbones("tiny", clip="ViT-B-16-quickgelu", clip_pretrained=str(path), clip_size=160)
    clip = load_backbones(spec).clip
    pos = clip.model.visual.positional_embedding
    assert pos.shape == (101, 768)
    torch.testing.assert_close(pos[0], reference.visual.positional_embedding[0])  # class token kept
    prepared = clip.prepare([image(100, 140, 14), image(90, 60, 15)])
    fmap = clip.feature_map(prepared)
    assert prepared.shape == (2, 3, 160, 160) and fmap.shape == (2, 101, 768)
    fp16_close(fmap, library_map(clip.model, prepared))


def test_state_dict_and_openai_archive_load_the_same_weights(tiny_configs, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = open_clip.create_model(QG)
    weights = openai_archive(model, tmp_path / "ViT-tiny.pt")
    assert is_torchscript(tmp_path / "ViT-tiny.pt")
    torch.save(weights, tmp_path / "state.pt")
    assert not is_torchscript(tmp_path / "state.pt")
    for file in ("ViT-tiny.pt", "state.pt"):
        loaded, *_ = load_clip(QG, str(tmp_path / file), 64)
        assert loaded.state_dict().keys() == weights.keys()
        assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items()), file
    # another size interpolates the position embeddings; the trained size keeps them as they are
    bigger, *_ = load_clip(QG, str(tmp_path / "ViT-tiny.pt"), 96)
    assert bigger.visual.positional_embedding.shape == (1 + 12 * 12, 64)


# --- text embeddings ----------------------------------------------------------------------------


def test_text_embeddings_are_the_normalised_mean_of_81_templates(tiny):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    names = ["cat", "traffic_light", "hot dog (food)"]
    text = tiny.clip.text_embeddings(names)
    assert text.shape == (3, 64) and text.dtype == torch.float32 and text.device.type == "cpu"
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    prompts = ["traffic_light."] + [t("traffic_light") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(prompts) == 81
    raw = tiny.clip.model.encode_text(tiny.clip.tokenizer(prompts))  # (81, D), unnormalised
    mean = raw.mean(0)
    torch.testing.assert_close(text[1], mean / mean.norm(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.clip.text_embeddings(names, batch_names=2), text, rtol=1e-5, atol=1e-5)
    assert tiny.clip.text_embeddings([]).shape == (0, 64)


# --- QuickGELU -----------------------------------------------------------------------------------


def test_quickgelu_mismatch_is_an_error(tiny_configs, tmp_path, monkeypatch):
    with pytest.raises(RegionSpotError, match="QuickGELU.*--clip ViT-B-16-quickgelu"):
        resolve_backbones("bb", clip="ViT-B-16")  # checked before anything is loaded
    # open_clip itself only warns; past the check (a spec built by hand) the warning is an error too
    weights = tmp_path / "downloaded.bin"
    weights.write_bytes(b"never read")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(weights))
    with pytest.raises(RegionSpotError, match="QuickGELU mismatch"):
        load_clip("ViT-B-16", "openai", 224)
    # OpenAI's TorchScript files always need QuickGELU
    openai_archive(open_clip.create_model(QG), tmp_path / "ViT-tiny.pt")
    with pytest.raises(
        RegionSpotError, match=f"trained with QuickGELU and {GELU} uses GELU; use --clip {QG}"
    ):
        load_clip(GELU, str(tmp_path / "ViT-tiny.pt"), 64)


# --- bad flags and files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("xl", {}, "--backbones 'xl': unknown preset; choose one of bb, bl, bl336, tiny"),
        ("tiny", {"sam": "vit_q"}, "--sam 'vit_q'"),
        ("bb", {}, "download sam_vit_b_01ec64.pth from https://dl.fbaipublicfiles.com/segment_anything/"),
        ("bl", {"sam_checkpoint": "/nowhere/sam.pth"}, "--sam-checkpoint /nowhere/sam.pth: no such file"),
        ("tiny", {"sam_tokens": 2}, "--sam-tokens 2: choose 1"),
        ("tiny", {"clip": "ViT-Q-99"}, "--clip 'ViT-Q-99': not an open_clip model"),
        (
            "tiny",
            {"clip": "RN50-quickgelu", "clip_pretrained": "openai"},
            "needs an open_clip vision transformer",
        ),
        ("tiny", {"clip_size": 60}, "--clip-size 60: must be a positive multiple of tiny's patch size 8"),
        ("bl336", {"sam": "tiny", "clip_size": 330}, "--clip-size 330: must be a positive multiple of"),
        (
            "bb",
            {"sam": "tiny", "clip_pretrained": "laion9"},
            "--clip-pretrained laion9: no such file, nor a tag",
        ),
        ("tiny", {"clip_pretrained": "openai"}, "--clip tiny is built from a fixed seed"),
    ],
)
def test_bad_flags_are_named_before_loading(preset, overrides, message):
    with pytest.raises(RegionSpotError) as err:
        resolve_backbones(preset, **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_problem_at_once_and_presets():
    assert list_presets() == ["bb", "bl", "bl336", "tiny"]
    with pytest.raises(RegionSpotError) as err:
        resolve_backbones("bl", sam_tokens=5, clip_size=7)
    assert all(flag in str(err.value) for flag in ("--sam-checkpoint", "--sam-tokens 5", "--clip-size 7"))
    spec = resolve_backbones("bl336", sam="tiny")
    assert (spec.clip, spec.clip_pretrained, spec.clip_size, spec.sam_tokens) == (
        "ViT-L-14-336-quickgelu",
        "openai",
        336,
        1,
    )


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_sam_checkpoints(tmp_path, capsys):
    with pytest.raises(RegionSpotError, match="sam_vit_h_4b8939.pth"):
        load_sam("vit_h", tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RegionSpotError, match="not a SAM state dict"):
        load_sam("vit_b", tmp_path / "garbage.pth")
    with open(tmp_path / "pickled.pth", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(RegionSpotError, match="weights_only"):
        load_sam("vit_b", tmp_path / "pickled.pth")
    assert "unpickled!" not in capsys.readouterr().out  # never unpickled
    torch.save(build_tiny_sam().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(RegionSpotError, match="does not hold SAM vit_b weights"):
        load_sam("vit_b", tmp_path / "tiny.pth")


def test_bad_clip_weights(tiny_configs, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RegionSpotError, match="cannot download.*--clip-pretrained PATH") as err:
        load_clip("ViT-B-16-quickgelu", "openai", 224)
    assert "\n" not in str(err.value)
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(RegionSpotError, match=f"does not hold {QG} weights"):
        load_clip(QG, str(tmp_path / "other.pt"), 64)


# --- determinism and fingerprints ----------------------------------------------------------------


def test_tiny_is_bit_identical_whatever_the_global_seed(tiny):
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    again = load_backbones(resolve_backbones("tiny"))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert again.fingerprint == tiny.fingerprint
    for a, b in [(again.sam.sam, tiny.sam.sam), (again.clip.model, tiny.clip.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for module in (again.sam.sam, again.clip.model):  # the frozen models the wrappers run
        assert not any(m.training for m in module.modules()) and not any(
            p.requires_grad for p in module.parameters()
        )


def test_fingerprint_follows_weights_tokens_and_size_not_paths(tiny, tiny_configs, tmp_path):
    info = tiny.info()
    assert info["fingerprint"] == tiny.fingerprint and info["clip"]["logit_scale"] == pytest.approx(100.0)
    assert {"model", "pretrained", "weights_sha256", "image_size", "width", "embed_dim"} <= set(info["clip"])
    assert load_backbones(resolve_backbones("tiny", sam_tokens=3)).fingerprint != tiny.fingerprint
    assert backbones_fingerprint("a", "b", 1, 224) != backbones_fingerprint("a", "b", 1, 336)
    bigger = load_backbones(resolve_backbones("tiny", clip_size=96))
    assert bigger.clip.num_tokens == 1 + 12 * 12 and bigger.fingerprint != tiny.fingerprint

    with torch.random.fork_rng():
        torch.manual_seed(5)
        weights = openai_archive(open_clip.create_model(QG), tmp_path / "ViT-tiny.pt")
    (tmp_path / "copy").mkdir()
    torch.save(weights, tmp_path / "copy" / "open_clip_pytorch_model.bin")
    prints = {}
    for file in ("ViT-tiny.pt", "copy/open_clip_pytorch_model.bin"):
        spec = resolve_backbones("tiny", clip=QG, clip_pretrained=tmp_path / file)
        prints[file] = load_backbones(spec)
    assert len({b.fingerprint for b in prints.values()}) == 1  # an OpenAI archive and a copy agree
    weights["logit_scale"] = weights["logit_scale"] + 1e-3
    torch.save(weights, tmp_path / "changed.bin")
    changed = load_backbones(resolve_backbones("tiny", clip=QG, clip_pretrained=tmp_path / "changed.bin"))
    assert changed.fingerprint != prints["ViT-tiny.pt"].fingerprint


def test_clip_encoder_checks_its_size(tiny):
    with pytest.raises(ValueError):
        ClipMapEncoder(tiny.clip.model, tiny.clip.tokenizer, 96)


# --- brief items not covered above ---------------------------------------------------------------


class _NotATensor:
    pass


def test_sam_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "object.pth")
    with pytest.raises(RegionSpotError, match="weights_only"):
        load_sam("vit_b", tmp_path / "object.pth")


def test_is_torchscript_tells_archives_from_state_dicts(tmp_path):
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    torch.jit.save(torch.jit.script(module), str(tmp_path / "scripted.pt"))
    torch.save(module.state_dict(), tmp_path / "state.pt")
    (tmp_path / "plain.bin").write_bytes(b"not a zip")
    assert is_torchscript(tmp_path / "scripted.pt")
    assert not is_torchscript(tmp_path / "state.pt") and not is_torchscript(tmp_path / "plain.bin")


def test_a_quickgelu_warning_from_create_model_is_an_error(monkeypatch):
    import warnings

    def warns(*args, **kwargs):
        warnings.warn("QuickGELU mismatch between model config and pretrained tag", UserWarning, stacklevel=2)
        raise AssertionError("the warning should have been raised as an error")

    monkeypatch.setattr(open_clip, "create_model", warns)
    with pytest.raises(RegionSpotError) as err:
        load_clip("ViT-B-16", "openai", 224)
    assert "-quickgelu" in str(err.value) and "QuickGELU mismatch" in str(err.value)


def test_text_embeddings_of_two_names_by_hand(tiny):
    from regionspot.models.clip import text_templates

    names = ["zebra", "fire hydrant"]
    text = tiny.clip.text_embeddings(names)
    templates = text_templates()
    assert len(templates) == 81
    for i, name in enumerate(names):
        with torch.no_grad():
            raw = tiny.clip.model.encode_text(
                tiny.clip.tokenizer([t(name) for t in templates]), normalize=False
            )
        mean = raw.mean(0)
        torch.testing.assert_close(text[i], mean / mean.norm(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(text[0], text[1])


@pytest.mark.gpu
def test_cuda_autocast_stays_close_to_the_cpu(tiny):
    """On CUDA the encoders run under fp16 autocast by default and still return float32 close to the CPU's."""
    gpu = load_backbones(resolve_backbones("tiny"), device="cuda")
    assert gpu.info()["runtime"]["precision"] == "fp16" and tiny.info()["runtime"]["precision"] == "fp32"
    img, boxes = image(120, 200, 16), [torch.tensor([[10.0, 10, 100, 80], [0, 0, 200, 120]])]
    cpu_tokens = tiny.sam.region_tokens(tiny.sam.encode(tiny.sam.prepare([img])), boxes, [img.shape[:2]])[0]
    out = gpu.sam.region_tokens(gpu.sam.encode(gpu.sam.prepare([img])), boxes, [img.shape[:2]], masks=True)[0]
    assert out.tokens.dtype == torch.float32 and out.tokens.device.type == "cuda" and len(out.masks) == 2
    torch.testing.assert_close(out.tokens.cpu(), cpu_tokens.tokens, rtol=0.05, atol=0.1)
    prepared = tiny.clip.prepare([img])
    fmap = gpu.clip.feature_map(prepared)
    assert fmap.dtype == torch.float32
    torch.testing.assert_close(fmap.cpu(), tiny.clip.feature_map(prepared), rtol=0.05, atol=0.1)
    torch.testing.assert_close(
        gpu.clip.text_embeddings(["cat"]), tiny.clip.text_embeddings(["cat"]), rtol=0.05, atol=0.05
    )


# --- precision and torch.compile ------------------------------------------------------------------


def test_precision_defaults_by_device_and_is_recorded_not_fingerprinted(tiny):
    assert (resolve_precision(None, "cuda"), resolve_precision(None, "cpu")) == ("fp16", "fp32")
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(RegionSpotError, match=r"--precision 'fp8': choose one of fp16, bf16, fp32"):
        resolve_precision("fp8", "cpu")
    assert tiny.info()["runtime"] == {"precision": "fp32", "sam_attention": "sdpa", "compile": False}
    bf16 = load_backbones(resolve_backbones("tiny"), precision="bf16")
    assert bf16.info()["runtime"]["precision"] == "bf16"
    assert bf16.fingerprint == tiny.fingerprint  # features within float rounding: a runtime choice
    img = image(120, 200, 16)
    fmap = bf16.clip.feature_map(bf16.clip.prepare([img]))
    expected = tiny.clip.feature_map(tiny.clip.prepare([img]))
    assert fmap.dtype == torch.float32 and not torch.equal(fmap, expected)  # autocast ran, on the CPU too
    torch.testing.assert_close(fmap, expected, rtol=0.05, atol=0.1)
    embeddings = bf16.sam.encode(bf16.sam.prepare([img]))
    torch.testing.assert_close(embeddings, tiny.sam.encode(tiny.sam.prepare([img])), rtol=0.05, atol=0.1)


def test_sam_attention_choice_keeps_weights_and_fingerprint(tiny):
    library = load_backbones(resolve_backbones("tiny"), sam_attention="library")
    assert library.info()["runtime"]["sam_attention"] == "library"
    assert library.sam_sha256 == tiny.sam_sha256 and library.fingerprint == tiny.fingerprint
    img = image(120, 200, 17)
    torch.testing.assert_close(
        tiny.sam.encode(tiny.sam.prepare([img])),
        library.sam.encode(library.sam.prepare([img])),
        rtol=1e-4,
        atol=1e-5,
    )
    with pytest.raises(RegionSpotError, match="--sam-attention 'flash': choose one of sdpa, library"):
        load_sam("tiny", None, attention="flash")


def test_compile_runs_the_compiled_forward_and_keeps_the_state_dict():
    backbones = load_backbones(resolve_backbones("tiny"))
    img = image(120, 200, 18)
    sam_in, clip_in = backbones.sam.prepare([img]), backbones.clip.prepare([img])
    eager = backbones.sam.encode(sam_in), backbones.clip.feature_map(clip_in)
    keys = backbones.sam.state_dict().keys(), backbones.clip.state_dict().keys()
    for encoder in (backbones.sam, backbones.clip):
        encoder.use_compile(backend="eager")  # dynamo's tracing without a C++ toolchain: fast on any CPU
    assert isinstance(backbones.sam.sam.image_encoder.forward, CompiledForward)
    assert isinstance(backbones.clip.model.visual.transformer.forward, CompiledForward)
    assert (backbones.sam.state_dict().keys(), backbones.clip.state_dict().keys()) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiling worked: no fallback warning
        compiled = backbones.sam.encode(sam_in), backbones.clip.feature_map(clip_in)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning(tiny, monkeypatch):
    calls = []

    def broken_compile(fn, **options):
        def run(*args, **kwargs):
            calls.append(options)
            raise RuntimeError("inductor: no working C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    backbones = load_backbones(resolve_backbones("tiny"), compile=True)
    assert backbones.info()["runtime"]["compile"] is True
    img = image(120, 200, 19)
    with pytest.warns(
        RuntimeWarning, match=r"torch.compile failed for SAM's image encoder .*no working C\+\+"
    ):
        first = backbones.sam.encode(backbones.sam.prepare([img]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the SAM fallback is for good: no second warning, no second try
        again = backbones.sam.encode(backbones.sam.prepare([img]))
    assert len(calls) == 1
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, tiny.sam.encode(tiny.sam.prepare([img])))
    with pytest.warns(RuntimeWarning, match="CLIP's visual transformer"):
        backbones.clip.feature_map(backbones.clip.prepare([img]))

    def refused(fn, **options):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refused)
    with pytest.warns(RuntimeWarning, match="Dynamo is not supported"):
        compile_forward(nn.Linear(2, 2), "a layer")
