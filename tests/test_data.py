"""Dataset readers, proposals and the toy set, on small files written in exactly the real formats."""

import copy
import dataclasses
import hashlib
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from regionspot.data import openimages, toy
from regionspot.data.boxes import best_n_in_order, sanitize_boxes
from regionspot.data.datasets import list_datasets, open_dataset, resolve_data_root
from regionspot.data.images import ImageDecodeError, image_size, load_image, load_record_image
from regionspot.data.proposals import cap_boxes, load_proposals
from regionspot.data.records import clean_class_name
from regionspot.errors import RegionSpotError
from regionspot.evaluate.detections import Detections


def write_jpeg(path, size, colour=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# --- COCO ---------------------------------------------------------------------------------------


def ann(i, image_id, category_id, bbox, **extra):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": 0,
        **extra,
    }


def coco_file(root):
    """instances_val2017.json in miniature: ids out of order, one image without annotations, and
    one of each bad box: crowd, NaN, zero width, negative height, beyond the image, outside it."""
    images = [
        {
            "id": 10,
            "file_name": "000000000010.jpg",
            "width": 64,
            "height": 48,
            "coco_url": "http://x/val2017/000000000010.jpg",
        },
        {"id": 2, "file_name": "000000000002.jpg", "width": 40, "height": 30},
        {"id": 3, "file_name": "000000000003.jpg", "width": 32, "height": 32},
    ]
    annotations = [
        ann(1, 10, 7, [1, 2, 10, 20]),
        ann(2, 10, 3, [5, 5, 4, 4], iscrowd=1),
        ann(3, 2, 3, [0, 0, 50, 10]),  # beyond the right edge: clipped to x1 = 40
        ann(4, 2, 7, [None, 0, 5, 5]),  # NaN
        ann(5, 2, 7, [3, 3, 0, 5]),  # zero width
        ann(6, 10, 3, [3, 3, 5, -2]),  # negative height
        ann(7, 10, 3, [100, 100, 5, 5]),  # outside the image
        ann(8, 10, 3, [30, 10, 4, 6]),
    ]
    categories = [{"id": 7, "name": "wall-other", "supercategory": "x"}, {"id": 3, "name": "person"}]
    write_json(
        root / "coco/annotations/instances_val2017.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )
    for im in images:
        write_jpeg(root / "coco/val2017" / im["file_name"], (im["width"], im["height"]))


def test_coco_reader_records_vocabulary_and_counts(tmp_path):
    coco_file(tmp_path)
    reader = open_dataset("coco", tmp_path)
    assert [c.id for c in reader.vocabulary] == [3, 7]  # sorted by id; label = position
    assert [c.name for c in reader.vocabulary] == ["person", "wall"]  # "-other" removed
    records = reader.records()
    assert [r.key for r in records] == ["10", "2", "3"]  # sorted by key
    r10, r2, r3 = records
    assert r10.image_id == 10 and (r10.width, r10.height) == (64, 48)
    np.testing.assert_array_equal(r10.boxes, [[1, 2, 11, 22], [30, 10, 34, 16]])
    np.testing.assert_array_equal(r10.labels, [1, 0])
    np.testing.assert_array_equal(r2.boxes, [[0, 0, 40, 10]])
    np.testing.assert_array_equal(r2.scores, [1.0])
    assert len(r3.boxes) == 0  # no annotations: kept with zero regions
    assert reader.stats == {
        "images": 3,
        "boxes": 3,
        "crowd_skipped": 1,
        "group_skipped": 0,
        "boxes_dropped": 4,
        "boxes_clipped": 1,
        "images_without_boxes": 1,
        "images_outside_root": 0,
    }
    assert load_image(r10.path).shape == (48, 64, 3)
    assert reader.image_ids() == {10, 2, 3}
    assert reader.record_by_image_id(2) is reader.record_by_image_id("2") is r2
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    assert reader.sources == {
        "annotations": "coco/annotations/instances_val2017.json",
        "sha256": hashlib.sha256(ann.read_bytes()).hexdigest(),
    }


def test_coco_spec_and_malformed_annotations(tmp_path):
    coco_file(tmp_path)
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    spec = f"coco:{ann}:{tmp_path / 'coco/val2017'}"
    reader = open_dataset(spec, tmp_path / "elsewhere")
    assert reader.name == spec and len(reader.records()) == 3
    assert reader.sources["annotations"] == "instances_val2017.json"  # outside the data root: the name

    data = json.loads(ann.read_text())
    data["annotations"][5]["bbox"] = [1, 2, 3]
    write_json(ann, data)
    with pytest.raises(
        RegionSpotError, match=r"instances_val2017\.json: malformed annotation 5 .*\[x, y, w, h\]"
    ):
        open_dataset(spec).records()
    data["annotations"][5]["bbox"] = [1, 2, 3, 4]
    data["annotations"][6]["category_id"] = 99
    write_json(ann, data)
    with pytest.raises(RegionSpotError, match=r"malformed annotation 6 .*category_id 99"):
        open_dataset(spec).records()
    ann.write_text('{"images": [}')
    with pytest.raises(RegionSpotError, match=r"instances_val2017\.json: malformed JSON .*line 1"):
        open_dataset(spec).records()


def test_no_annotations_at_all_is_images_with_zero_regions(tmp_path):
    coco_file(tmp_path)
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    write_json(ann, {**json.loads(ann.read_text()), "annotations": []})
    reader = open_dataset("coco", tmp_path)
    assert [len(r.boxes) for r in reader.records()] == [0, 0, 0]
    assert reader.stats["images"] == 3 and reader.stats["boxes"] == 0
    assert reader.stats["images_without_boxes"] == 3


def test_string_numbers_in_annotations_are_refused(tmp_path):
    coco_file(tmp_path)
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    spec = f"coco:{ann}:{tmp_path / 'coco/val2017'}"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [1, 2, "10", 20]  # numpy alone would read it as 10.0
    write_json(ann, data)
    with pytest.raises(
        RegionSpotError, match=r"malformed annotation 0 .*'bbox' must hold numbers, not strings"
    ):
        open_dataset(spec).records()
    data["annotations"][0]["bbox"] = [1, 2, 10, 20]
    data["images"][1]["width"] = "40"
    write_json(ann, data)
    with pytest.raises(
        RegionSpotError,
        match=r"malformed image record 1 .*'width' must be a positive number, not the string '40'",
    ):
        open_dataset(spec).records()


def test_class_names_lose_other_merged_and_stuff_wherever_they_occur(tmp_path):
    assert clean_class_name("sky-other-merged") == clean_class_name("sky") == "sky"
    assert clean_class_name("wall-stuff") == "wall" and clean_class_name("tree-merged") == "tree"
    assert clean_class_name("rock-merged-other") == "rock" and clean_class_name("t-shirt") == "t-shirt"
    coco_file(tmp_path)
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = "sky-other-merged"
    write_json(ann, data)
    assert [c.name for c in open_dataset("coco", tmp_path).vocabulary] == ["person", "sky"]


def test_file_names_that_leave_the_image_folder_are_skipped_unless_allowed(tmp_path):
    from regionspot.extract.decode import ImageFiles

    coco_file(tmp_path)
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    data = json.loads(ann.read_text())
    write_jpeg(tmp_path / "secret.jpg", (40, 30))
    data["images"][1]["file_name"] = "../../secret.jpg"  # image 2, from coco/val2017/
    data["images"][2]["file_name"] = str(tmp_path / "secret.jpg")  # image 3, absolute
    data["images"][2].update(width=40, height=30)
    write_json(ann, data)
    reader = open_dataset("coco", tmp_path)
    r10, r2, r3 = reader.records()
    assert r10.skip_reason is None and reader.stats["images_outside_root"] == 2
    for r in (r2, r3):
        assert r.skip_reason.startswith(f"file_name {r.file_name!r} leaves the image folder")
        assert "--allow-outside-root" in r.skip_reason
        with pytest.raises(ImageDecodeError, match="leaves the image folder"):
            load_record_image(r)
    assert len(r2.boxes) == 1  # the record stays: extraction lists it as skipped, evaluation counts it
    decoded = ImageFiles(reader.records())
    assert [d.error for d in (decoded[0], decoded[1], decoded[2])] == [None, r2.skip_reason, r3.skip_reason]

    allowed = open_dataset("coco", tmp_path, allow_outside_root=True)
    assert allowed.stats["images_outside_root"] == 0
    assert all(r.skip_reason is None for r in allowed.records())
    assert load_record_image(allowed.record_by_image_id(2)).shape == (30, 40, 3)
    assert allowed.record_by_image_id(3).path == tmp_path / "secret.jpg"

    openimages_files(tmp_path, True)  # OpenImages: an ImageID that is an absolute path
    boxes = tmp_path / "openimages/oidv6-train-annotations-bbox.csv"
    boxes.write_text(boxes.read_text().replace("0000a1b2c3d4e5f6", "/tmp/x"))
    oi = open_dataset("openimages", tmp_path)
    refused = oi.record_by_image_id("/tmp/x")
    assert oi.stats["images_outside_root"] == 1 and "leaves the image folder" in refused.skip_reason
    assert (refused.width, refused.height) == (0, 0)  # its header is not read either


def test_lvis_images_resolve_through_coco_url(tmp_path):
    images = [
        {
            "id": 397133,
            "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
            "width": 64,
            "height": 40,
            "neg_category_ids": [2],
            "not_exhaustive_category_ids": [],
            "license": 1,
            "flickr_url": "",
            "date_captured": "",
        },
        {
            "id": 9,
            "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
            "width": 50,
            "height": 50,
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [1],
        },
    ]
    categories = [
        {
            "id": 2,
            "name": "aerosol_can",
            "synonyms": ["aerosol_can", "spray_can"],
            "frequency": "c",
            "def": "",
            "synset": "x",
            "image_count": 3,
            "instance_count": 5,
        },
        {"id": 1, "name": "acorn", "synonyms": ["acorn"], "frequency": "r", "def": "", "synset": "y"},
    ]
    annotations = [
        {
            "id": 1,
            "image_id": 397133,
            "category_id": 1,
            "bbox": [1.5, 2.5, 10, 10],
            "area": 80.0,
            "segmentation": [[1, 2, 3, 4, 5, 6]],
        },
        {
            "id": 2,
            "image_id": 9,
            "category_id": 2,
            "bbox": [0, 0, 60, 10],
            "area": 1.0,
            "segmentation": [[0, 0, 1, 1, 2, 0]],
        },
    ]
    write_json(
        tmp_path / "lvis/lvis_v1_val.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )
    write_jpeg(tmp_path / "coco/val2017/000000397133.jpg", (64, 40))
    write_jpeg(tmp_path / "coco/train2017/000000000009.jpg", (50, 50))
    reader = open_dataset("lvis_val", tmp_path)
    r397133, r9 = reader.records()
    assert (r397133.key, r9.key) == ("397133", "9")
    assert r397133.path == tmp_path / "coco/val2017/000000397133.jpg"
    assert r9.path == tmp_path / "coco/train2017/000000000009.jpg" and r9.path.is_file()
    assert r9.file_name == "train2017/000000000009.jpg"
    np.testing.assert_array_equal(r397133.boxes, [[1.5, 2.5, 11.5, 12.5]])
    np.testing.assert_array_equal(r9.boxes, [[0, 0, 50, 10]])
    acorn, can = reader.vocabulary
    assert (acorn.id, acorn.frequency, can.synonyms) == (1, "r", ("aerosol_can", "spray_can"))
    assert reader.stats["boxes_clipped"] == 1


def test_objects365_v2_and_v3det_layouts(tmp_path):
    # Objects365 v2: file names carry images/v1/patchN/, the images sit in train/patchN/.
    o365 = {
        "images": [
            {
                "height": 30,
                "id": 420917,
                "license": 5,
                "width": 40,
                "file_name": "images/v1/patch8/objects365_v1_00420917.jpg",
                "url": "",
            }
        ],
        "annotations": [
            {
                "id": 1,
                "iscrowd": 0,
                "isfake": 0,
                "area": 20.0,
                "isreflected": 0,
                "bbox": [1, 1, 4, 5],
                "image_id": 420917,
                "category_id": 1,
            }
        ],
        "categories": [{"name": "Person", "id": 1}, {"name": "Sneakers", "id": 2}],
        "licenses": [],
    }
    write_json(tmp_path / "objects365/zhiyuan_objv2_train.json", o365)
    write_jpeg(tmp_path / "objects365/train/patch8/objects365_v1_00420917.jpg", (40, 30))
    reader = open_dataset("o365", tmp_path)
    (record,) = reader.records()
    assert record.path == tmp_path / "objects365/train/patch8/objects365_v1_00420917.jpg"
    assert reader.sources["annotations"] == "objects365/zhiyuan_objv2_train.json"
    assert [c.name for c in reader.vocabulary] == ["Person", "Sneakers"]

    # V3Det: file names relative to V3Det/.
    v3det = {
        "images": [
            {
                "file_name": "Images/a00000066/0_2530_11591900204_c1c10c1531_c.jpg",
                "height": 20,
                "width": 30,
                "id": 5,
            }
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 0, "bbox": [2, 2, 3, 3], "area": 9, "iscrowd": 0}
        ],
        "categories": [
            {
                "id": 0,
                "name": "Hangul",
                "image_count": 1,
                "instance_count": 1,
                "cat_info": "..",
                "cat_info_gpt": "..",
            }
        ],
    }
    write_json(tmp_path / "v3det/v3det_2023_v1_train.json", v3det)
    write_jpeg(tmp_path / "v3det/V3Det/Images/a00000066/0_2530_11591900204_c1c10c1531_c.jpg", (30, 20))
    (record,) = open_dataset("v3det", tmp_path).records()
    assert record.path.is_file() and record.file_name.startswith("Images/a00000066/")
    np.testing.assert_array_equal(record.labels, [0])


# --- OpenImages ---------------------------------------------------------------------------------

OI_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def openimages_files(root, classes_header: bool):
    d = root / "openimages"
    d.mkdir(parents=True)
    rows = [
        "000002b66c9c498e,xclick,/m/01g317,1,0.1,0.5,0.25,0.75,0,1,0,0,0",
        "000002b66c9c498e,xclick,/m/0199g,1,0.5,1.2,0.0,0.5,0,0,0,0,0",  # clipped to XMax 1
        "000002b66c9c498e,xclick,/m/01g317,1,0.0,1.0,0.0,1.0,0,0,1,0,0",  # group
        "00000c4f1bff6d1e,activemil,/m/0199g,1,0.3,0.3,0.1,0.2,0,0,0,0,0",  # zero width
        "00000c4f1bff6d1e,xclick,/m/0199g,1,nan,0.3,0.1,0.2,0,0,0,0,0",  # NaN
        "0000a1b2c3d4e5f6,xclick,/m/01g317,1,0.0,1.0,0.0,1.0,0,0,1,0,0",  # only a group box
    ]
    (d / "oidv6-train-annotations-bbox.csv").write_text(OI_HEADER + "\n" + "\n".join(rows) + "\n")
    classes = (
        "LabelName,DisplayName\n" if classes_header else ""
    ) + "/m/011k07,Tortoise\n/m/01g317,Person\n/m/0199g,Bicycle\n"
    (d / "class-descriptions-boxable.csv").write_text(classes)
    for image_id, size in (
        ("000002b66c9c498e", (100, 80)),
        ("00000c4f1bff6d1e", (60, 60)),
        ("0000a1b2c3d4e5f6", (30, 20)),
    ):
        write_jpeg(d / "train" / f"{image_id}.jpg", size)


@pytest.mark.parametrize("classes_header", [True, False])
def test_openimages_reader(tmp_path, monkeypatch, classes_header):
    openimages_files(tmp_path, classes_header)
    reads = []
    monkeypatch.setattr(openimages, "image_size", lambda p: reads.append(p) or image_size(p))
    reader = open_dataset("openimages", tmp_path)
    records = reader.records()
    assert [c.name for c in reader.vocabulary] == ["Tortoise", "Person", "Bicycle"]
    assert [c.id for c in reader.vocabulary] == [1, 2, 3]
    assert reader.label_names == ["/m/011k07", "/m/01g317", "/m/0199g"]
    assert [r.key for r in records] == ["000002b66c9c498e", "00000c4f1bff6d1e", "0000a1b2c3d4e5f6"]
    assert reader.stats["group_skipped"] == 2 and reader.stats["boxes_dropped"] == 2
    assert reader.stats["boxes_clipped"] == 1 and reader.stats["images_without_boxes"] == 2
    assert reads == []  # sizes are read on first use, not by records()
    first = records[0]
    assert (first.width, first.height) == (100, 80) and len(reads) == 1
    np.testing.assert_allclose(first.boxes, [[10, 20, 50, 60], [50, 0, 100, 40]])
    np.testing.assert_array_equal(first.labels, [1, 2])
    assert first.image_id == "000002b66c9c498e" and first.path.name == "000002b66c9c498e.jpg"
    assert len(records[2].boxes) == 0 and (records[2].width, records[2].height) == (30, 20)
    assert set(reader.sources) == {"annotations", "sha256", "classes", "classes_sha256"}
    # Records travel to DataLoader workers and through dataclasses.replace.
    assert pickle.loads(pickle.dumps(records[1])).width == 60
    replaced = dataclasses.replace(
        first, boxes=first.boxes[:1], labels=first.labels[:1], scores=first.scores[:1]
    )
    assert replaced.width == 100 and len(replaced.boxes) == 1
    assert copy.deepcopy(first).boxes.shape == (2, 4)


def test_openimages_errors(tmp_path):
    openimages_files(tmp_path, True)
    boxes = tmp_path / "openimages/oidv6-train-annotations-bbox.csv"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join([lines[0], lines[1], lines[2].replace("/m/0199g", "/m/0xxxx")]) + "\n")
    with pytest.raises(
        RegionSpotError, match=r"oidv6-train-annotations-bbox\.csv: malformed row at line 3 .*/m/0xxxx"
    ):
        open_dataset("openimages", tmp_path).records()
    boxes.write_text("ImageID,XMin\n1,0.5\n")
    with pytest.raises(RegionSpotError, match=r"header row lacks LabelName, XMax"):
        open_dataset("openimages", tmp_path).records()
    (tmp_path / "openimages/class-descriptions-boxable.csv").unlink()
    with pytest.raises(RegionSpotError, match=r"missing .*openimages/class-descriptions-boxable\.csv"):
        open_dataset("openimages", tmp_path)


# --- names, roots, missing files ----------------------------------------------------------------


def test_named_datasets_and_data_root(tmp_path, monkeypatch):
    assert list_datasets() == ["coco", "lvis_val", "o365", "openimages", "toy", "toy_val", "v3det"]
    with pytest.raises(
        RegionSpotError, match=r"^unknown dataset 'o356'; available: coco, lvis_val, o365, openimages, toy"
    ):
        open_dataset("o356", tmp_path)
    with pytest.raises(RegionSpotError, match=r"missing .*lvis/lvis_v1_val\.json .*lvisdataset\.org"):
        open_dataset("lvis_val", tmp_path)
    with pytest.raises(RegionSpotError, match=r"incomplete"):
        open_dataset("coco:only.json", tmp_path)
    monkeypatch.setenv("REGIONSPOT_DATASETS", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("REGIONSPOT_DATASETS")
    assert str(resolve_data_root(None)) == "datasets"
    coco_file(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "coco/val2017")
    with pytest.raises(RegionSpotError, match=r"missing .*coco/val2017 \(images of 'coco'\)"):
        open_dataset("coco", tmp_path)
    assert len(open_dataset("coco", tmp_path, check_images=False).records()) == 3


# --- images and boxes ---------------------------------------------------------------------------


def test_load_image_modes_orientation_and_errors(tmp_path):
    Image.new("L", (7, 5), 100).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").shape == (5, 7, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": annotations use the stored grid, so it is not applied
    Image.new("RGB", (8, 4), (1, 2, 3)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (4, 8, 3)
    assert image_size(tmp_path / "rotated.jpg") == (8, 4)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for bad in (tmp_path / "bad.jpg", tmp_path / "absent.jpg"):
        with pytest.raises(ImageDecodeError, match=bad.name):
            load_image(bad)
    data = (tmp_path / "rotated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "truncated.jpg")


def test_sanitize_boxes():
    boxes = np.array(
        [[0, 0, 5, 5], [-2, 1, 3, 12], [np.inf, 0, 1, 1], [4, 4, 4, 9], [20, 20, 30, 30]], np.float32
    )
    clipped, keep, counts = sanitize_boxes(boxes, 10, 10)
    np.testing.assert_array_equal(keep, [True, True, False, False, False])
    np.testing.assert_array_equal(clipped[1], [0, 1, 3, 10])
    assert counts == {"dropped_invalid": 3, "clipped": 1}
    _, keep, _ = sanitize_boxes(boxes[:2], np.array([10, 1]), np.array([10, 1]))  # per-box sizes
    np.testing.assert_array_equal(keep, [True, False])


# --- proposals ----------------------------------------------------------------------------------


def test_proposal_formats_agree_and_merge(tmp_path):
    coco_file(tmp_path)
    reader = open_dataset("coco", tmp_path)
    results = [  # one record per box and category, as detectors write them; ids as int and str
        {"image_id": 10, "bbox": [1, 2, 10, 20], "score": 0.3, "category_id": 3},
        {"image_id": 10, "bbox": [1, 2, 10, 20], "score": 0.9, "category_id": 7},
        {"image_id": "10", "bbox": [50, 40, 30, 30], "score": 0.5, "category_id": 3},  # clipped
        {"image_id": 10, "bbox": [5, 5, 0, 3], "score": 0.8},  # empty: dropped (NaN is refused, see below)
        {"image_id": 2, "bbox": [0, 0, 4, 4], "score": 0.7, "category_id": 3},
        {"image_id": 2, "bbox": [1, 1, 4, 4], "score": 0.2, "category_id": 3},
    ]
    official = {
        "10": {
            "boxes": [[1, 2, 11, 22], [50, 40, 80, 70], [5, 5, 5, 8]],
            "scores": [0.9, 0.5, 0.8],
            "labels": [7, 3, 0],
        },
        "2": {"boxes": [[0, 0, 4, 4], [1, 1, 5, 5]], "scores": [0.7, 0.2], "labels": [3, 3]},
    }
    coco_style = load_proposals(write_json(tmp_path / "dets.json", results), reader)
    official_style = load_proposals(write_json(tmp_path / "official.json", official), reader)
    assert coco_style.stats["duplicates_merged"] == 1 and coco_style.sha256 != official_style.sha256
    a, b = coco_style.apply(reader.records()), official_style.apply(reader.records())
    for ra, rb in zip(a, b, strict=True):
        assert ra.key == rb.key
        for field in ("boxes", "labels", "scores"):
            np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field))
    r10, r2, r3 = a
    np.testing.assert_array_equal(r10.boxes, [[1, 2, 11, 22], [50, 40, 64, 48]])
    np.testing.assert_allclose(r10.scores, [0.9, 0.5])
    np.testing.assert_array_equal(r10.labels, [-1, -1])
    assert len(r3.boxes) == 0
    assert coco_style.stats["boxes_dropped"] == 1 and coco_style.stats["boxes_clipped"] == 1
    assert coco_style.stats["images_without_proposals"] == 1
    capped = coco_style.apply(reader.records(), max_boxes=1)
    assert [r.scores.tolist() for r in capped] == [[pytest.approx(0.9)], [pytest.approx(0.7)], []]


def test_malformed_proposals_name_the_first_records(tmp_path):
    coco_file(tmp_path)
    reader = open_dataset("coco", tmp_path)
    bad = [
        {"image_id": 10, "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 10, "score": 0.4},
        {"image_id": 2, "bbox": [1, 2]},
    ]
    with pytest.raises(
        RegionSpotError, match=r"2 of 3 records malformed, first: record 1 .*no 'bbox'.*; record 2"
    ):
        load_proposals(write_json(tmp_path / "bad.json", bad), reader)
    with pytest.raises(RegionSpotError, match=r"1 of 1 images malformed, first: image '10'"):
        load_proposals(write_json(tmp_path / "bad2.json", {"10": {"scores": [1.0]}}), reader)
    unknown = [{"image_id": i, "bbox": [0, 0, 1, 1], "score": 1} for i in (10, 555, 556)]
    with pytest.raises(RegionSpotError, match=r"2 image id\(s\) not in dataset 'coco' \(first: 555, 556\)"):
        load_proposals(write_json(tmp_path / "unknown.json", unknown), reader)
    (tmp_path / "broken.json").write_text('[{"image_id": 10,')
    with pytest.raises(RegionSpotError, match=r"broken\.json: malformed JSON"):
        load_proposals(tmp_path / "broken.json", reader)


def test_non_finite_negative_string_and_empty_proposals_are_refused(tmp_path):
    coco_file(tmp_path)
    reader = open_dataset("coco", tmp_path)
    good = {"image_id": 10, "bbox": [1, 2, 3, 4], "score": 0.5}
    cases = [  # a record of the results list -> what the message says about it
        ({"image_id": 2, "bbox": [1, 2, 3, 4], "score": float("nan")}, r"score nan is not finite"),
        ({"image_id": 2, "bbox": [1, 2, 3, 4], "score": float("inf")}, r"score inf is not finite"),
        ({"image_id": 2, "bbox": [1, 2, 3, 4], "score": -0.1}, r"score -0\.1 is negative"),
        ({"image_id": 2, "bbox": [1, 2, 3, 4], "score": "0.5"}, r"score '0\.5' is a string"),
        ({"image_id": 2, "bbox": [1, float("nan"), 3, 4], "score": 0.5}, r"coordinate nan is not finite"),
        ({"image_id": 2, "bbox": [1, 2, -float("inf"), 4]}, r"coordinate -inf is not finite"),
        ({"image_id": 2, "bbox": [1, None, 3, 4]}, r"coordinate null is not a number"),
        ({"image_id": 2, "bbox": ["10", 2, 3, 4], "score": 0.5}, r"coordinate '10' is a string"),
    ]
    for bad, why in cases:
        path = write_json(tmp_path / "p.json", [good, good, bad])  # json.dumps writes NaN as NaN
        with pytest.raises(
            RegionSpotError,
            match=rf"proposals .*p\.json: 1 of 3 records malformed, first: record 2 \(image_id 2\) .*: {why}",
        ):
            load_proposals(path, reader)
    for index, box, score, why in (  # the official dict: image "2" holds two boxes, one bad
        (1, [1, 1, 5, 5], float("nan"), r"score nan is not finite"),
        (0, [0, 0, 4, 4], -1, r"score -1 is negative"),
        (1, [1, 1, float("inf"), 5], 0.5, r"coordinate inf is not finite"),
        (0, [1, "2", 3, 4], 0.5, r"coordinate '2' is a string"),
    ):
        entry = {"boxes": [[0, 0, 4, 4], [1, 1, 5, 5]], "scores": [0.5, 0.5]}
        entry["boxes"][index], entry["scores"][index] = box, score
        path = write_json(tmp_path / "o.json", {"10": {"boxes": [[1, 2, 3, 4]], "scores": [0.5]}, "2": entry})
        with pytest.raises(
            RegionSpotError,
            match=rf"o\.json: 1 of 2 images malformed, first: image '2' .*: box {index}: {why}",
        ):
            load_proposals(path, reader)
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(RegionSpotError, match=r"^proposals .*empty\.json is empty"):
        load_proposals(tmp_path / "empty.json", reader)
    for nothing in ([], {}, {"10": {"boxes": [], "scores": []}}):
        with pytest.raises(RegionSpotError, match=r"^proposals .*none\.json holds no boxes .*AP 0"):
            load_proposals(write_json(tmp_path / "none.json", nothing), reader)


def test_detections_refuse_non_finite_values_and_write_strict_json(tmp_path):
    dets = Detections([10, 20])
    dets.add(1, np.array([[0, 0, 2, 2]]), np.array([1]), np.array([0.5]))
    for boxes, scores, what in (
        ([[0, 0, 2, 2]], [np.nan], "scores"),
        ([[0, 0, 2, 2]], [np.inf], "scores"),
        ([[0, np.nan, 2, 2]], [0.5], "boxes"),
    ):
        with pytest.raises(RegionSpotError, match=rf"^image 7: detection {what} are not finite"):
            dets.add(7, np.array(boxes), np.array([0]), np.array(scores))
    dets.write_json(tmp_path / "d.json")
    text = (tmp_path / "d.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in detections.json"))
    assert [d["image_id"] for d in strict] == [1]


def test_toy_annotations_are_strict_json(tmp_path):
    ann, _ = toy.ensure_toy(tmp_path, "val", num_images=2)
    json.loads(ann.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {ann}"))


def test_best_n_in_order():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1, 0.5])
    np.testing.assert_array_equal(best_n_in_order(scores, 3), [1, 2, 3])  # ties: the first 0.5
    np.testing.assert_array_equal(best_n_in_order(scores, 1), [1])
    np.testing.assert_array_equal(best_n_in_order(scores, None), np.arange(6))
    np.testing.assert_array_equal(best_n_in_order(scores, 10), np.arange(6))
    assert best_n_in_order(scores, 0).size == 0 and best_n_in_order(np.zeros(0), 2).size == 0


def test_cap_boxes_keeps_the_largest(tmp_path):
    coco_file(tmp_path)
    r10 = open_dataset("coco", tmp_path).record_by_image_id(10)  # areas 200 and 24
    capped = cap_boxes(r10, 1)
    np.testing.assert_array_equal(capped.boxes, [[1, 2, 11, 22]])
    np.testing.assert_array_equal(capped.labels, [1])
    assert cap_boxes(r10, 5) is r10


# --- toy ----------------------------------------------------------------------------------------


def test_toy_is_lvis_format_with_real_frequencies(toy_root):  # toy_root: conftest, default sizes
    reader = open_dataset("toy", toy_root)
    data = json.loads((toy_root / "toy/annotations/toy_train.json").read_text())
    assert len(data["images"]) == 600 and reader.stats["images"] == 600 and reader.stats["boxes_dropped"] == 0
    limits = {"r": (1, 10), "c": (11, 100), "f": (101, 600)}
    for cat in data["categories"]:
        low, high = limits[cat["frequency"]]
        assert low <= cat["image_count"] <= high, cat
        assert cat["synonyms"] and cat["name"] in cat["synonyms"]
    assert {c["frequency"] for c in data["categories"]} == {"r", "c", "f"}
    all_ids = {c["id"] for c in data["categories"]}
    shown = {}
    for a in data["annotations"]:
        shown.setdefault(a["image_id"], set()).add(a["category_id"])
        assert a["segmentation"] and a["area"] > 0 and len(a["bbox"]) == 4
    for im in data["images"]:
        assert im["not_exhaustive_category_ids"] == []
        assert set(im["neg_category_ids"]) == all_ids - shown[im["id"]]
        assert 2 <= len(shown[im["id"]]) <= 5
    record = reader.records()[0]
    assert record.path.suffix == ".png" and load_image(record.path).shape == (128, 160, 3)


def test_toy_classes_are_colours(toy_root):
    """Each class is one colour, far from every other class and from the grey background."""
    reader = open_dataset("toy", toy_root)
    means = {}
    for record in reader.records():
        pixels = load_image(record.path).astype(np.float32)
        for box, label in zip(record.boxes.astype(int), record.labels, strict=True):
            x0, y0, x1, y1 = box
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2  # the centre of every shape type lies inside it
            means.setdefault(int(label), []).append(
                pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].mean(axis=(0, 1))
            )
    centres = {k: np.mean(v, axis=0) for k, v in means.items()}
    spread = max(np.linalg.norm(np.array(v) - centres[k], axis=1).max() for k, v in means.items())
    assert len(centres) == 10 and spread < 40
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in centres for b in centres if a < b]
    assert min(gaps) > 2 * spread
    grey = np.array([128, 128, 128])
    assert min(np.linalg.norm(c - grey) for c in centres.values()) > 80


def test_toy_is_deterministic_and_atomic(tmp_path, monkeypatch):
    for split, alias, ext in (("val", "toy_val", ".jpg"), ("train", "toy", ".png")):
        a_json, a_images = toy.ensure_toy(tmp_path / "a", split, num_images=6)
        b_json, b_images = toy.ensure_toy(tmp_path / "b", alias, num_images=6)
        assert a_json.read_bytes() == b_json.read_bytes()
        files = sorted(p.name for p in a_images.iterdir())
        assert len(files) == 6 and files[0].endswith(ext)
        assert all((a_images / f).read_bytes() == (b_images / f).read_bytes() for f in files)
    assert len(open_dataset("toy_val", tmp_path / "a").records()) == 6  # an existing split is taken as it is

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        toy.ensure_toy(tmp_path / "c", "train", num_images=4)
    assert not (tmp_path / "c/toy/annotations").exists() and not (tmp_path / "c/toy/images").exists()
    assert [p.name for p in (tmp_path / "c/toy").iterdir()] == [".train.lock"]
    monkeypatch.undo()
    ann, images = toy.ensure_toy(tmp_path / "c", "train", num_images=4)
    assert len(json.loads(ann.read_text())["images"]) == 4 and len(list(images.iterdir())) == 4
    ann, images = toy.ensure_toy(tmp_path / "c", "train", num_images=5)  # a different size regenerates
    assert len(list(images.iterdir())) == 5
