"""Decoding images for extraction: high bit depths, EXIF orientation and the annotated size."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from regionspot.data.images import ImageDecodeError, load_image, load_record_image
from regionspot.data.records import ImageRecord

EXIF_ORIENTATION = 0x0112


def write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of uint16 [H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA (Pillow writes only grey)."""
    height, width = pixels.shape[:2]
    colour_type = {2: 0, 3: 2, 4: 6}[pixels.ndim if pixels.ndim == 2 else pixels.shape[2]]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def record(path, width, height):
    return ImageRecord(key="1", image_id=1, file_name=path.name, path=path, width=width, height=height)


def test_16_bit_pngs_decode_like_their_8_bit_versions(tmp_path):
    rng = np.random.default_rng(0)
    rgba8 = rng.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    rgba8[0, :4, 0] = [0, 1, 128, 255]  # the ends of the range
    widened = rgba8.astype(np.uint16) * 257  # the PNG rule for 8 -> 16 bits (v << 8 | v)
    noisy = widened & 0xFF00 | rng.integers(0, 256, widened.shape).astype(np.uint16)  # low byte: any

    Image.fromarray(rgba8[..., 0], "L").save(tmp_path / "grey8.png")
    Image.fromarray(rgba8[..., :3], "RGB").save(tmp_path / "rgb8.png")
    Image.fromarray(widened[..., 0]).save(tmp_path / "grey16.png")  # Pillow writes I;16 as 16-bit grey
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    write_png16(tmp_path / "grey16_noisy.png", noisy[..., 0])
    write_png16(tmp_path / "rgb16.png", noisy[..., :3])
    write_png16(tmp_path / "rgba16.png", widened)

    grey = load_image(tmp_path / "grey8.png")
    rgb = load_image(tmp_path / "rgb8.png")
    assert len(np.unique(grey)) > 40  # not the all-white image 16-bit grey once decoded to
    for name in ("grey16.png", "grey16_noisy.png"):
        np.testing.assert_array_equal(load_image(tmp_path / name), grey, err_msg=name)
    for name in ("rgb16.png", "rgba16.png"):
        np.testing.assert_array_equal(load_image(tmp_path / name), rgb, err_msg=name)
    sized = record(tmp_path / "grey16.png", 9, 6)
    np.testing.assert_array_equal(load_record_image(sized), grey)

    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageDecodeError, match=r"float\.tif: 32-bit float pixels"):
        load_image(tmp_path / "float.tif")


def test_exif_orientation_is_applied_only_where_the_annotation_asks_for_it(tmp_path):
    rng = np.random.default_rng(1)
    stored = np.repeat(np.repeat(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), 4, 0), 4, 1)  # 24 x 40
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    raw = load_image(tmp_path / "rotated.jpg")  # the stored grid, 40 wide and 24 high
    assert raw.shape == (24, 40, 3)
    Image.fromarray(np.rot90(raw, k=-1)).save(tmp_path / "upright.png")  # the same pixels, turned by hand

    turned = load_record_image(record(tmp_path / "rotated.jpg", 24, 40))  # annotated upright: 24 x 40
    np.testing.assert_array_equal(turned, load_image(tmp_path / "upright.png"))
    as_stored = load_record_image(record(tmp_path / "rotated.jpg", 40, 24))  # annotated on the stored grid
    np.testing.assert_array_equal(as_stored, raw)

    exif[EXIF_ORIENTATION] = (
        3  # 180 degrees: the size cannot tell, so it is applied, as the official code does
    )
    Image.fromarray(stored).save(tmp_path / "upside_down.jpg", exif=exif, quality=95)
    np.testing.assert_array_equal(
        load_record_image(record(tmp_path / "upside_down.jpg", 40, 24)),
        load_image(tmp_path / "upside_down.jpg")[::-1, ::-1],
    )


def test_an_image_not_of_the_annotated_size_is_skipped_or_resampled(tmp_path):
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "small.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "turned.jpg", exif=exif)
    wrong = record(tmp_path / "small.png", 80, 40)
    with pytest.raises(
        ImageDecodeError, match=r"small\.png: image is 40x20, the annotation says 80x40.*--size-mismatch"
    ):
        load_record_image(wrong)
    with pytest.raises(
        ImageDecodeError,
        match=r"turned\.jpg: image is 40x20 \(20x40 with its EXIF orientation\), the annotation says 30x30",
    ):
        load_record_image(record(tmp_path / "turned.jpg", 30, 30))
    resampled = load_record_image(wrong, size_mismatch="rescale")
    assert resampled.shape == (40, 80, 3) and (resampled == (200, 10, 10)).all()
    with pytest.raises(ValueError, match="size_mismatch"):
        load_record_image(wrong, size_mismatch="stretch")


def test_a_record_with_a_skip_reason_is_not_read(tmp_path):
    refused = record(tmp_path / "absent.png", 4, 4)
    refused.skip_reason = "file_name '../x.png' leaves the image folder"
    with pytest.raises(ImageDecodeError, match=r"^file_name '\.\./x\.png' leaves the image folder$"):
        load_record_image(refused)
