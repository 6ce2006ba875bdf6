"""Predict: the Python API against the evaluation path, point and automatic prompts, the pictures,
the batch CLI and its error messages. CPU, tiny backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionspot.draw import attention_map, draw_attention, draw_regions, label_colors
from regionspot.errors import RegionSpotError
from regionspot.predict_batch import expand_inputs, output_names, parse_boxes, parse_points, parse_vocab


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


def test_attention_map_and_sheet():
    grid = 7
    attention = np.zeros((2, 1 + grid * grid), np.float32)
    attention[0, 1] = 1.0  # top-left patch
    attention[1, -1] = 1.0  # bottom-right patch
    heat = attention_map(attention[0], 70, 35)
    assert heat.shape == (35, 70) and heat[0, 0] > 0.9 and heat[-1, -1] < 0.1
    sheet = draw_attention(np.zeros((35, 70, 3), np.uint8), np.array([[0, 0, 10, 10], [60, 25, 70, 35]]),
                           ["a", "b"], [0.5, 0.5], attention)  # fmt: skip
    assert sheet.ndim == 3 and sheet.shape[1] > 70  # two panels side by side
