"""Predict: the Python API against the evaluation path, point and automatic prompts, the pictures,
the batch CLI and its error messages. CPU, tiny backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from regionspot.cli import app
from regionspot.errors import RegionSpotError
from regionspot.predict.draw import (
    PALETTE,
    attention_map,
    draw_attention,
    draw_regions,
    label_colors,
    legible_factor,
    point_radius,
    region_colors,
)
from regionspot.predict.inputs import (
    check_outputs,
    expand_inputs,
    output_file,
    output_names,
    parse_boxes,
    parse_points,
    parse_vocab,
)


# --- option parsing and inputs (no model) ---------------------------------------------------------
def test_parse_boxes_points_vocab():
    np.testing.assert_array_equal(parse_boxes("1,2,30,40; 5.5,6,7e1,80;"), [[1, 2, 30, 40], [5.5, 6, 70, 80]])
    np.testing.assert_array_equal(parse_points("3,4;5,6"), [[3, 4], [5, 6]])
    assert parse_vocab(" cat, dog ,sofa") == ["cat", "dog", "sofa"]
    for text, fragment in [("", "--boxes is empty"), ("1,2,3", "entry #1 '1,2,3'"), ("1,2,a,4", "not 4"),
                           ("10,10,5,20", r"box #1 \[10.0, 10.0, 5.0, 20.0\] is empty")]:  # fmt: skip
        with pytest.raises(RegionSpotError, match=fragment):
            parse_boxes(text)
    with pytest.raises(RegionSpotError, match="--points is empty"):
        parse_points(" ; ")
    for names, fragment in [
        (" , ", "empty"),
        ("cat,,dog", "#2 is blank"),
        ("cat,dog,cat", "'cat' given more"),
    ]:
        with pytest.raises(RegionSpotError, match=fragment):
            parse_vocab(names)


def _write_image(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_inputs_and_output_names(tmp_path):
    a = _write_image(tmp_path / "imgs" / "x" / "001.jpg")
    b = _write_image(tmp_path / "imgs" / "y" / "001.png")
    c = _write_image(tmp_path / "imgs" / "y" / "two.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    paths = expand_inputs([str(tmp_path / "imgs"), str(a)])  # folder recursive, duplicates dropped
    assert paths == [a, b, c]
    assert output_names(paths) == [Path("x/001"), Path("y/001"), Path("two")]
    assert output_names([c]) == [Path("two")]
    assert expand_inputs([str(tmp_path / "imgs" / "*" / "*.png")]) == [b, c]
    with pytest.raises(RegionSpotError, match="name no image: 'nope.jpg'"):
        expand_inputs([str(a), "nope.jpg"])


def test_outputs_never_take_an_input_name(tmp_path):
    """Same stem in one folder: distinct outputs; predict's own outputs are no inputs of a folder or glob;
    an output that would replace an input named explicitly is refused."""
    folder = tmp_path / "photos"
    jpg, png = _write_image(folder / "img.jpg"), _write_image(folder / "img.png")
    names = output_names([jpg, png])
    assert names == [Path("img.jpg"), Path("img.png")]
    assert [output_file(folder, n, "png").name for n in names] == ["img.jpg.regionspot.png", "img.png.regionspot.png"]
    assert output_file(folder, Path("a/b"), "attention") == folder / "a" / "b.regionspot.attention.png"
    earlier = _write_image(folder / "img.jpg.regionspot.png")  # a first run's picture in the input folder
    assert expand_inputs([str(folder)]) == [jpg, png]
    assert expand_inputs([str(folder / "*.png")]) == [png]
    check_outputs([jpg, png], names, folder, ["json", "png"])  # nothing collides
    other = _write_image(folder / "other.png")
    named = [other, _write_image(folder / "other.regionspot.png")]  # given explicitly: both are inputs
    with pytest.raises(RegionSpotError, match="would replace the input image") as info:
        check_outputs(named, output_names(named), folder, ["json", "png"])
    assert "\n" not in str(info.value) and earlier.exists()


# --- pictures ---------------------------------------------------------------------------------
def test_draw_regions_marks_each_box_and_keeps_text_inside():
    image = np.full((60, 80, 3), 128, np.uint8)
    boxes = np.array([[5, 5, 40, 30], [50, 30, 80, 60], [-10, -5, 200, 10]], np.float32)
    masks = [np.zeros((60, 80), bool) for _ in boxes]
    masks[0][10:20, 10:30] = True
    out = draw_regions(image, boxes, ["cat", "dog", "a very long label indeed"], [0.9, 0.2, 0.5], masks)
    assert out.shape == image.shape and out.dtype == np.uint8
    for x0, y0, x1, y1 in np.clip(boxes, 0, [80, 60, 80, 60]).astype(int):
        assert (out[y0:y1, x0:x1] != image[y0:y1, x0:x1]).any()
    assert (out[12:18, 12:28] != 128).any()  # the mask is tinted
    colors = label_colors(["cat", "dog", "cat"])
    assert colors["cat"] != colors["dog"] and len(colors) == 2


def _colour_share(picture: np.ndarray, color, region=np.s_[:, :]) -> float:
    return float((picture[region] == np.array(color, np.uint8)).all(-1).mean())


def test_regions_of_one_label_get_their_own_colours_points_markers_and_haloed_outlines():
    """Six regions of one class: six colours (mask, outline, tab); a clicked point is drawn; each box
    outline has a dark halo; no two caption tabs overlap."""
    image = np.full((400, 600, 3), 200, np.uint8)
    boxes = np.array([[20 + 90 * i, 60, 100 + 90 * i, 300] for i in range(6)], np.float32)
    masks = []
    for x0, y0, x1, y1 in boxes.astype(int):
        mask = np.zeros((400, 600), bool)
        mask[y0 + 20 : y1 - 20, x0 + 10 : x1 - 10] = True
        masks.append(mask)
    points = [None] * 6
    points[2] = (float(boxes[2, 0] + boxes[2, 2]) / 2, 150.0)
    out = draw_regions(image, boxes, ["person"] * 6, [0.9] * 6, masks, points=points)
    colors = region_colors(6)
    assert len(set(colors)) == 6
    tinted = [tuple(out[200, int(x0 + x1) // 2]) for x0, _, x1, _ in boxes if x0 != boxes[2, 0]]
    assert len(set(tinted)) == 5  # each mask has its own tint
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        assert _colour_share(out, colors[i], np.s_[y0:y1, x0:x1]) > 0.01  # the region's colour is drawn
        assert (out[y0 + 100, x0 - 1] == 0).all() or (out[y0 + 100, x0 - 2] == 0).all()  # the dark halo
    x, y = (int(round(v)) for v in points[2])
    r = point_radius(600, 400)
    assert tuple(out[y, x]) == colors[2]  # the marker's dot ...
    ring = out[y, x + r - 1]
    assert (ring == 255).all()  # ... in a white ring ...
    assert (out[y, x + r + 1] == 0).all()  # ... with a dark rim
    without = draw_regions(image, boxes, ["person"] * 6, [0.9] * 6, masks)
    assert (out[y - r : y + r, x - r : x + r] != without[y - r : y + r, x - r : x + r]).any()


def test_caption_tabs_do_not_overlap():
    from regionspot.predict.draw import _place

    taken = []
    for _ in range(5):  # five captions for one box: shifted along it, then stacked
        x, y = _place((100, 100, 300, 200), (80, 20), 640, 480, taken)
        assert 0 <= x <= 640 - 80 and 0 <= y <= 480 - 20
        taken.append((x, y, x + 80, y + 20))
    for i, a in enumerate(taken):
        for b in taken[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_small_pictures_are_drawn_enlarged():
    image = np.random.default_rng(0).integers(0, 255, (128, 160, 3), dtype=np.uint8)
    assert legible_factor(160, 128, 384) == 3 and legible_factor(3000, 2000, 384) == 1
    out = draw_regions(image, np.array([[10, 10, 50, 50]], np.float32), ["cat"], [0.5], min_side=384)
    assert out.shape == (384, 480, 3)
    np.testing.assert_array_equal(out[300:303, 300:303], np.broadcast_to(image[100, 100], (3, 3, 3)))
    assert PALETTE[0] in {tuple(p) for p in out[30:150, 30].tolist()}  # the box, enlarged with the image


def test_attention_map_and_sheet():
    grid = 7
    attention = np.zeros((2, 1 + grid * grid), np.float32)
    attention[0, 1] = 1.0  # top-left patch
    attention[1, -1] = 1.0  # bottom-right patch
    heat = attention_map(attention[0], 70, 35)
    assert heat.shape == (35, 70) and heat[0, 0] > 0.9 and heat[-1, -1] < 0.1
    sheet = draw_attention(np.zeros((35, 70, 3), np.uint8), np.array([[0, 0, 10, 10], [60, 25, 70, 35]]),
                           ["a", "b"], [0.5, 0.5], attention)  # fmt: skip
    assert sheet.ndim == 3 and sheet.shape[1] >= 2 * 256  # two panels side by side, enlarged to be legible
    header = sheet[:40]
    from regionspot.predict.draw import heat_colors

    hot = heat_colors(np.array([1.0]))[0].astype(int)  # the colour bar's top end (blended over grey)
    assert (np.abs(header.astype(int) - (hot * 0.6 + 0.4 * 0.6 * 128)).sum(-1) < 30).any()
    for color in region_colors(2):  # each title's swatch in its region's colour
        assert (sheet == np.array(color, np.uint8)).all(-1).sum() > 50


# --- CLI: option errors come before any model is loaded -------------------------------------------
def _cli(args: list[str]):
    from typer.testing import CliRunner

    from regionspot.cli import app

    return CliRunner().invoke(app, ["predict", *args], env={"COLUMNS": "200"})  # error boxes on one line


@pytest.fixture
def no_models(monkeypatch):
    """Fail loudly if anything tries to load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("regionspot.predict.predictor.RegionPredictor.from_checkpoint", refuse)


def test_cli_help_lists_the_options():
    result = _cli(["--help"])
    assert result.exit_code == 0
    for flag in ("--vocab", "--vocab-file", "--boxes", "--boxes-file", "--points", "--checkpoint", "--backbones",
                 "--masks", "--no-masks", "--attention", "--embeddings", "--topk", "--out", "--batch-size"):  # fmt: skip
        assert flag in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--boxes", "1,2,3,4"], "--vocab"),
        (["--vocab", " , ", "--boxes", "1,2,3,4"], "--vocab is empty"),
        (["--vocab", "cat", "--boxes", ""], "--boxes is empty"),
        (["--vocab", "cat", "--boxes", "1,2,3;4,5,6,7"], "entry #1 '1,2,3'"),
        (
            ["--vocab", "cat", "--boxes", "1,2,3,4", "--points", "1,2"],
            "--boxes and --points: give at most one",
        ),
    ],
)
def test_cli_option_errors(tmp_path, no_models, args, fragment):
    image = _write_image(tmp_path / "a.png")
    ckpt = tmp_path / "head.safetensors"
    ckpt.write_bytes(b"")
    result = _cli([str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, RegionSpotError), result.output
    message = str(result.exception)
    assert fragment in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, typer_says, value, config_says",
    [
        (["--topk", "0"], "'--topk': Input should be greater than or equal to 1", {"topk": 0},
         "--topk 0: must be at least 1"),
        (["--backbones", "huge"], "'huge' is not one of 'bb', 'bl', 'bl336', 'tiny'", {"backbones": "huge"},
         "--backbones 'huge'"),
    ],
)  # fmt: skip
def test_range_and_choice_errors_exit_2_and_read_the_same_in_python(
    tmp_path, no_models, args, typer_says, value, config_says
):
    """typer refuses what the config declares (exit code 2, nothing run); PredictConfig built in Python
    refuses the same value with a one-line message naming the flag."""
    from regionspot.predict.config import PredictConfig

    image = _write_image(tmp_path / "a.png")
    ckpt = tmp_path / "head.safetensors"
    ckpt.write_bytes(b"")
    result = _cli([str(image), "--vocab", "cat", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and typer_says in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(RegionSpotError) as info:
        PredictConfig(images=[str(image)], vocab="cat", checkpoint=ckpt, **value).check()
    assert config_says in str(info.value) and "\n" not in str(info.value)


def test_cli_missing_inputs_and_one_line_error(tmp_path, no_models, monkeypatch, capsys):
    import sys

    from regionspot.cli import main

    monkeypatch.setattr(sys, "argv", ["regionspot", "predict", str(tmp_path / "nope.jpg"), "--vocab", "cat",
                                      "--checkpoint", str(tmp_path / "missing")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "--checkpoint" in err and "no such file" in err


# --- the predictor (tiny backbones, a tiny head checkpoint) ------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from regionspot.models.presets import load_backbones, resolve_backbones

    return load_backbones(resolve_backbones("tiny"))


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A head checkpoint directory for the tiny backbones, as training saves it."""
    import torch

    from regionspot.models.checkpoint import save_head
    from regionspot.models.head import RegionSpotHead

    torch.manual_seed(1)
    head = RegionSpotHead(tiny.clip.width, tiny.clip.embed_dim, ff_dim=128, logit_scale=tiny.clip.logit_scale)
    path = tmp_path_factory.mktemp("ckpt") / "step-0000010"
    save_head(head, path, tiny.fingerprint)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from regionspot.predict.predictor import RegionPredictor

    return RegionPredictor.from_checkpoint(checkpoint, "tiny", device="cpu")


def test_boxes_get_the_labels_and_scores_of_the_evaluation_path(toy_shards, toy_root, predictor):
    """The evaluation path: cached (float16) shards -> padded batches -> head -> region_probabilities."""
    import torch

    from regionspot.data.datasets import open_dataset
    from regionspot.data.images import load_image
    from regionspot.data.records import clean_class_name
    from regionspot.models.scoring import region_probabilities
    from regionspot.shards.loader import iter_batches
    from regionspot.shards.shardset import ShardSet

    shards = ShardSet(toy_shards["toy_val"])
    reader = open_dataset("toy_val", toy_root)
    names = [clean_class_name(v["name"]) for v in shards.vocabulary]
    predictor.set_vocabulary(names)
    np.testing.assert_allclose(predictor._text.numpy(), shards.text_embeddings(), atol=1e-6)
    text = torch.as_tensor(shards.text_embeddings())
    checked = 0
    for batch, samples in iter_batches(shards, batch_size=4):
        b = batch.to("cpu", dtype=torch.float32)
        with torch.inference_mode():
            logits = predictor.head(b.sam_tokens, b.clip_map, text, region_mask=b.region_mask)
        for i, sample in enumerate(samples):
            n = sample.num_regions
            if n == 0:
                continue
            expected = region_probabilities(logits[i, :n], b.sam_iou[i, :n])  # [n, K]
            predictor.set_image(load_image(reader.record_by_image_id(sample.image_id).path))
            regions = predictor.predict(boxes=sample.boxes, topk=len(names), masks=False)
            assert [r.label for r in regions] == [names[k] for k in expected.argmax(1).tolist()]
            np.testing.assert_allclose([r.score for r in regions], expected.max(1).values.numpy(), atol=1e-5)
            for r, row in zip(regions, expected, strict=True):
                got = dict(r.topk)
                np.testing.assert_allclose([got[nm] for nm in names], row.numpy(), atol=1e-5)
            np.testing.assert_array_equal(np.array([r.box for r in regions], np.float32), sample.boxes)
            checked += 1
        if checked >= 4:
            break
    assert checked >= 4


def _toy_image(toy_root) -> np.ndarray:
    from regionspot.data.datasets import open_dataset
    from regionspot.data.images import load_image

    return load_image(open_dataset("toy_val", toy_root).records()[0].path)


def test_points_and_automatic_regions(predictor, toy_root):
    image = _toy_image(toy_root)
    h, w = image.shape[:2]
    predictor.set_vocabulary(["red square", "blue circle", "green triangle"])
    predictor.set_image(image)
    regions = predictor.predict(points=[[w / 4, h / 4], [w / 2, h / 2]], topk=2)
    assert len(regions) == 2 and [r.point for r in regions] == [(w / 4, h / 4), (w / 2, h / 2)]
    for r in regions:
        assert r.mask_array().shape == (h, w) and r.token in (0, 1, 2) and len(r.topk) == 2
        assert 0 <= r.box[0] < r.box[2] <= w and 0 <= r.box[1] < r.box[3] <= h
        assert r.score == r.topk[0][1] and r.label == r.topk[0][0]
    from regionspot.predict.config import automatic_defaults

    assert predictor.automatic == automatic_defaults("tiny")  # the defaults find regions with tiny too
    auto = predictor.predict(masks=True)
    assert len(auto) >= 1 and all(r.mask_array().shape == (h, w) for r in auto)


def test_embeddings_attention_and_errors(predictor, tiny, toy_root):
    image = _toy_image(toy_root)
    predictor.set_vocabulary(["cat", "dog"])
    predictor.set_image(image)
    regions = predictor.predict(boxes=[[-20, 5, 40, 30], [10, 10, 60, 50]], embeddings=True, attention=True)
    assert regions[0].box[0] == 0  # clipped to the image
    for r in regions:
        assert r.embedding.shape == (tiny.clip.embed_dim,) and abs(np.linalg.norm(r.embedding) - 1) < 1e-3
        assert r.attention.shape == (tiny.clip.num_tokens,)
    with pytest.raises(RegionSpotError, match=r"box #0 \[5000.0, 5000.0, 6000.0, 6000.0\] is outside the image"):
        predictor.predict(boxes=[[5000, 5000, 6000, 6000]])
    with pytest.raises(RegionSpotError, match=r"box #1 \[30.0, 10.0, 20.0, 40.0\] is empty"):
        predictor.predict(boxes=[[1, 1, 9, 9], [30, 10, 20, 40]])
    with pytest.raises(RegionSpotError, match="vocabulary is empty"):
        predictor.set_vocabulary([])
    with pytest.raises(RegionSpotError, match="'cat' given more than once"):
        predictor.set_vocabulary(["cat", "cat"])


def test_checkpoint_of_other_backbones_is_refused(tiny, tmp_path):
    from regionspot.models.checkpoint import save_head
    from regionspot.models.head import RegionSpotHead
    from regionspot.predict.predictor import RegionPredictor

    save_head(RegionSpotHead(tiny.clip.width, tiny.clip.embed_dim, ff_dim=128), tmp_path / "other", "f" * 64)
    with pytest.raises(RegionSpotError, match="fingerprint") as info:
        RegionPredictor.from_checkpoint(tmp_path / "other", "tiny", device="cpu")
    assert "\n" not in str(info.value) and "--backbones" in str(info.value)


# --- CLI end to end ---------------------------------------------------------------------------------
def _images_for_cli(tmp_path, toy_root):
    """Two copies of a toy image with the same stem in two folders, and a corrupt file."""
    image = _toy_image(toy_root)
    paths = []
    for folder in ("a", "b"):
        path = tmp_path / "in" / folder / "000000000042.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    (tmp_path / "in" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return image, paths


def test_cli_writes_json_pictures_attention_and_embeddings(tmp_path, toy_root, checkpoint, tiny):
    image, paths = _images_for_cli(tmp_path, toy_root)
    h, w = image.shape[:2]
    out = tmp_path / "out"
    boxes = f"4,4,{w // 2},{h // 2};{w // 3},{h // 3},{w + 50},{h + 50};{w + 10},0,{w + 20},10"
    result = _cli([str(tmp_path / "in"), "--vocab", "square, circle,triangle", "--boxes", boxes,
                   "--checkpoint", str(checkpoint), "--backbones", "tiny", "--attention", "--embeddings",
                   "--topk", "2", "--out", str(out), "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 unreadable image(s) skipped" in result.output and "broken.jpg" in result.output
    assert "1 box(es) of the 160x128 image dropped (#3 outside the image)" in result.output  # per image
    assert "2 box(es) dropped (outside the image)" in result.output  # the summary
    f = 384 // min(w, h) + (384 % min(w, h) > 0)  # a toy image is drawn enlarged by this factor
    big = image.repeat(f, 0).repeat(f, 1)
    for name in ("a/000000000042", "b/000000000042"):  # same stem, different folders: relative paths kept
        record = json.loads((out / f"{name}.regionspot.json").read_text())
        assert (record["width"], record["height"]) == (w, h) and record["image"].endswith("000000000042.png")
        regions = record["regions"]
        assert len(regions) == 2 and record["dropped_boxes"][0]["index"] == 2
        assert record["dropped_boxes"][0]["reason"] == "outside the image"
        assert regions[1]["box"] == [w // 3, h // 3, w, h]  # clipped
        for r in regions:
            assert set(r) >= {"box", "label", "score", "topk", "iou", "mask"} and len(r["topk"]) == 2
            assert r["label"] == r["topk"][0][0] and r["mask"]["size"] == [h, w]
        picture = np.asarray(Image.open(out / f"{name}.regionspot.png"))
        assert picture.shape == big.shape
        for r in regions:
            x0, y0, x1, y1 = (int(v) * f for v in r["box"])
            assert (picture[y0:y1, x0:x1] != big[y0:y1, x0:x1]).any()
        assert Image.open(out / f"{name}.regionspot.attention.png").size[0] >= 2 * 256
        emb = np.load(out / f"{name}.regionspot.embeddings.npy", allow_pickle=False)
        assert emb.shape == (2, tiny.clip.embed_dim) and emb.dtype == np.float32


def test_cli_boxes_file_points_and_no_masks(tmp_path, toy_root, checkpoint):
    image, paths = _images_for_cli(tmp_path, toy_root)
    (tmp_path / "in" / "b" / "broken.jpg").unlink()
    h, w = image.shape[:2]
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps([{"image_id": 42, "bbox": [2, 3, 20, 20], "score": 0.7},
                                      {"image_id": 42, "bbox": [10, 10, 30, 25], "score": 0.9}]))  # fmt: skip
    common = [
        "--vocab",
        "square,circle",
        "--checkpoint",
        str(checkpoint),
        "--backbones",
        "tiny",
        "--no-progress",
    ]
    result = _cli(
        [str(paths[0]), "--boxes-file", str(boxes_file), "--no-masks", "--out", str(tmp_path / "o1"), *common]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((tmp_path / "o1" / "000000000042.regionspot.json").read_text())
    assert [r["box"] for r in record["regions"]] == [[2, 3, 22, 23], [10, 10, 40, 35]]
    assert [r["proposal_score"] for r in record["regions"]] == pytest.approx([0.7, 0.9])
    assert all("mask" not in r for r in record["regions"])

    boxes_file.write_text(json.dumps({"42": {"boxes": [[1, 1, 9, 9]]}, "7": {"boxes": [[1, 1, 9, 9]]}}))
    result = _cli([str(paths[0]), "--boxes-file", str(boxes_file), "--out", str(tmp_path / "o2"), *common])
    assert isinstance(result.exception, RegionSpotError) and "first: 7" in str(result.exception)

    points = f"{w // 2},{h // 2};{w + 100},5"
    result = _cli([str(paths[0]), "--points", points, "--out", str(tmp_path / "o3"), *common])
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((tmp_path / "o3" / "000000000042.regionspot.json").read_text())
    (region,) = record["regions"]
    assert region["point"] == [w // 2, h // 2] and region["mask"]["size"] == [h, w]
    assert record["dropped_points"] == [{"index": 1, "point": [w + 100, 5]}]
    assert "1 point(s) outside their image dropped" in result.output


def test_official_checkpoint_is_imported_with_the_chosen_backbones(tiny, checkpoint, tmp_path, toy_root):
    """A .pth in the official layout (head under ckpt["model"] with the `model.` prefix, frozen SAM and
    CLIP weights beside it) names regions exactly as the same head saved by this project."""
    import torch

    from regionspot.models.checkpoint import load_head
    from regionspot.predict.predictor import RegionPredictor

    head, _, _ = load_head(checkpoint)
    state = head.to_official_state_dict()
    state.update(
        {"model.sam.image_encoder.pos_embed": torch.zeros(2), "model.clip_model.logit_scale": torch.ones(())}
    )
    official = tmp_path / "regionspot_tiny.pth"
    torch.save({"model": state, "iteration": 10}, official)

    image = _toy_image(toy_root)
    boxes = [[2, 2, 30, 30], [10, 5, 60, 40]]
    results = []
    for source in (official, checkpoint):
        p = RegionPredictor.from_checkpoint(source, "tiny", device="cpu")
        assert p.imported == (source == official)
        p.set_vocabulary(["square", "circle", "triangle"])
        p.set_image(image)
        results.append(p.predict(boxes=boxes, masks=False))
    assert [r.label for r in results[0]] == [r.label for r in results[1]]
    np.testing.assert_allclose([r.score for r in results[0]], [r.score for r in results[1]], atol=1e-6)


def test_predict_into_its_input_folder_leaves_the_inputs_unchanged(tmp_path, toy_root, checkpoint):
    image = _toy_image(toy_root)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(image).save(folder / "img.png")
    Image.fromarray(image).save(folder / "img.jpg", quality=90)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = [str(folder), "--vocab", "square,circle", "--boxes", "2,2,40,40", "--checkpoint", str(checkpoint),
            "--out", str(folder), "--no-progress", "--attention", "--embeddings"]  # fmt: skip
    for _ in range(2):  # the second run takes none of the first run's outputs for an image
        result = _cli(args)
        assert result.exit_code == 0, (result.output, result.exception)
        assert "2 image(s), 2 region(s) named" in result.output
    assert {name: (folder / name).read_bytes() for name in before} == before
    written = sorted(p.name for p in folder.iterdir() if p.name not in before)
    assert written == sorted(f"img.{ext}.regionspot.{kind}" for ext in ("jpg", "png")
                             for kind in ("json", "png", "attention.png", "embeddings.npy"))  # fmt: skip


def test_a_tiny_checkpoint_brings_the_tiny_backbones(tmp_path, checkpoint, monkeypatch):
    """Without --backbones, a checkpoint whose fingerprint is the tiny preset's uses tiny (predict and
    eval); --backbones naming another preset is refused, saying the fingerprint is tiny's."""
    from regionspot.predict.config import PredictConfig
    from regionspot.predict.predictor import RegionPredictor

    image = _write_image(tmp_path / "a.png")
    cfg = PredictConfig(images=[str(image)], vocab="cat", checkpoint=checkpoint).check()
    assert (cfg.backbones, cfg.sam_tokens) == ("tiny", 1)
    assert RegionPredictor.from_checkpoint(checkpoint, device="cpu").backbones.spec.sam == "tiny"
    for command in (["predict", str(image), "--vocab", "cat"], ["eval", "--dataset", "toy_val"]):
        result = CliRunner().invoke(app, [*command, "--checkpoint", str(checkpoint), "--backbones", "bl"])
        assert isinstance(result.exception, RegionSpotError), result.output
        message = str(result.exception)
        assert "fingerprint of the tiny preset" in message and "--backbones tiny" in message
        assert "--sam-checkpoint" not in message and "\n" not in message
    seen = []
    monkeypatch.setattr("regionspot.evaluate.runner.run_eval", lambda cfg: seen.append(cfg))
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--dataset", "toy_val"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (seen[0].backbones, seen[0].sam_tokens) == ("tiny", 1)
    other = tmp_path / "other"  # a head of real backbones (unknown fingerprint): the default stays bl
    from regionspot.models.checkpoint import load_head, save_head

    save_head(load_head(checkpoint)[0], other, "f" * 64)
    CliRunner().invoke(app, ["eval", "--checkpoint", str(other), "--dataset", "toy_val"])
    assert seen[1].backbones == "bl"


def test_automatic_regions_see_at_most_sam_s_input_size_in_bounded_batches(predictor, monkeypatch):
    from regionspot.predict.predictor import AUTOMATIC_BATCH_BYTES, ImageFeatures

    calls = []

    def generator(image, points_per_side, **options):
        calls.append((image.shape, points_per_side, options))
        h, w = image.shape[:2]
        return np.array([[0, 0, w / 2, h / 2], [1, 1, 1.5, 1.5]], np.float32)  # the second: < 100 px in the photo

    monkeypatch.setattr(predictor.backbones.sam, "automatic_boxes", generator)
    photo = ImageFeatures(np.zeros((2000, 3000, 3), np.uint8), None, None)
    predictor.automatic = {"points_per_side": 16, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.6,
                           "min_mask_region_area": 100}  # fmt: skip
    boxes = predictor.automatic_boxes(photo)
    side = predictor.backbones.sam.img_size
    (shape, points, options), = calls
    assert max(shape[:2]) == side and points == 16  # the generator saw the photo at SAM's input size
    assert options["pred_iou_thresh"] == 0.5 and options["stability_score_thresh"] == 0.6
    scale = side / 3000
    assert options["min_mask_region_area"] == int(100 * scale * scale)
    np.testing.assert_allclose(boxes, [[0, 0, 1500, 1000]], atol=3000 / side)  # back in the photo's pixels
    monkeypatch.setattr(predictor.backbones.sam, "img_size", 4096)  # a SAM that sees the photo whole
    predictor.automatic_boxes(photo)
    shape, _, options = calls[-1]
    assert shape[:2] == (2000, 3000)
    assert options["points_per_batch"] == AUTOMATIC_BATCH_BYTES // (3 * 8 * 2000 * 3000)  # memory bound


def test_automatic_mode_says_which_threshold_to_lower(tmp_path, toy_root, checkpoint):
    image, paths = _images_for_cli(tmp_path, toy_root)
    (tmp_path / "in" / "b" / "broken.jpg").unlink()
    result = _cli([str(paths[0]), "--vocab", "square,circle", "--checkpoint", str(checkpoint), "--no-progress",
                   "--points-per-side", "4", "--pred-iou-thresh", "0.99", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 image(s) without regions" in result.output
    assert "lower --pred-iou-thresh (now 0.99): with --pred-iou-thresh 0 SAM keeps" in result.output
    result = _cli([str(paths[0]), "--vocab", "cat", "--checkpoint", str(checkpoint), "--pred-iou-thresh", "1.5"])
    assert isinstance(result.exception, RegionSpotError) and "--pred-iou-thresh 1.5: must be in [0, 1]" in str(
        result.exception
    )
