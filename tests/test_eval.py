"""The evaluation stage: options, shard-set choice, the results file, baselines' crops, and end to end
on the toy dataset with the tiny backbones and a tiny head."""

import json

import numpy as np
import pytest

from regionspot.errors import RegionSpotError
from regionspot.evaluate.baselines import crop_region
from regionspot.evaluate.config import EvalConfig
from regionspot.evaluate.detections import Detections
from regionspot.evaluate.features import Wanted, mismatch
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


# --- which shard set serves an evaluation ------------------------------------------------------------

MANIFEST = {
    "dataset": {"name": "lvis_val", "sources": {"annotations": "lvis/lvis_v1_val.json", "sha256": "aaa"}},
    "proposals": {"source": "gt"},
    "backbones": {"fingerprint": "f" * 64},
    "run": {"shard_size": 1000, "limit": None, "max_boxes": None, "masks": False},
}
WANT = Wanted("lvis_val", "aaa", None, "f" * 64, masks=False, limit=None)


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"dataset": {"name": "coco", "sources": {"sha256": "aaa"}}}, "dataset is 'coco'"),
        ({"dataset": {"name": "lvis_val", "sources": {"sha256": "bbb"}}}, "annotation file differs"),
        ({"proposals": {"source": "glip.json", "sha256": "ccc"}}, "not the annotated boxes"),
        ({"backbones": {"fingerprint": "e" * 64}}, "fingerprint"),
        ({"run": {"limit": 10, "max_boxes": None, "masks": False}}, "--limit 10"),
        ({"run": {"limit": None, "max_boxes": 50, "masks": False}}, "--max-boxes 50"),
    ],
)
def test_mismatch_names_the_field(change, phrase):
    assert mismatch(MANIFEST, WANT) is None
    assert phrase in mismatch({**MANIFEST, **change}, WANT)


def test_mismatch_masks_proposals_and_limits():
    assert "without --masks" in mismatch(
        MANIFEST, Wanted("lvis_val", "aaa", None, None, masks=True, limit=None)
    )
    glip = {**MANIFEST, "proposals": {"source": "glip.json", "sha256": "ccc"}}
    assert mismatch(glip, Wanted("lvis_val", "aaa", "ccc", None, False, None)) is None
    assert "sha256 differs" in mismatch(glip, Wanted("lvis_val", "aaa", "ddd", None, False, None))
    limited = {**MANIFEST, "run": {**MANIFEST["run"], "limit": 100}}
    assert mismatch(limited, Wanted("lvis_val", "aaa", None, None, False, limit=50)) is None


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
