"""The encoders' preprocessing as tensor ops (models/preprocess.py) against SAM's and CLIP's references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from regionspot.models.clip import OPENAI_MEAN, OPENAI_STD
from regionspot.models.preprocess import clip_input, sam_input, sam_resize
from regionspot.models.sam import build_tiny_sam

# (height, width, SAM input size): down- and upscales, portrait and landscape, extreme aspects, tiny images
SIZES = [(480, 640, 1024), (640, 427, 1024), (1500, 1100, 1024), (300, 2000, 1024), (2000, 3000, 1024),
         (480, 640, 256), (128, 160, 256), (37, 53, 256), (3, 2, 64), (1024, 768, 1024)]


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth structure plus noise, so that resampling filters differ visibly."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


@pytest.mark.parametrize(("height", "width", "size"), SIZES)
def test_sam_resize_matches_resize_longest_side(height, width, size):
    image = photo(height, width, seed=height + width)
    reference = ResizeLongestSide(size).apply_image(image)  # PIL bilinear, SAM's own preprocessing
    resized = sam_resize(chw(image), size)
    assert resized.dtype == torch.uint8 and resized.shape == (3, *reference.shape[:2])
    diff = np.abs(resized.permute(1, 2, 0).numpy().astype(int) - reference)
    assert (diff <= 1).mean() >= 0.999 and diff.max() <= 2, (diff.max(), (diff > 0).mean())


def test_sam_input_normalises_and_pads_as_sam_does():
    sam = build_tiny_sam()
    images = [chw(photo(h, w, seed=i)) for i, (h, w) in enumerate([(120, 200), (300, 100), (256, 256)])]
    batch = sam_input(images, 256, sam.pixel_mean, sam.pixel_std)
    assert batch.shape == (3, 3, 256, 256) and batch.dtype == torch.float32
    for image, x in zip(images, batch, strict=True):
        torch.testing.assert_close(x, sam.preprocess(sam_resize(image, 256).float()), rtol=0, atol=0)
    assert (batch[0, :, 154:] == 0).all() and (batch[1, :, :, 86:] == 0).all()  # padded bottom / right


def reference_clip(image: np.ndarray, size: int, antialias: bool) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False)[0]
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


def test_clip_input_is_the_official_resize_unless_antialias_is_asked_for():
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate([(480, 640), (100, 60), (224, 224)])]
    default = clip_input([chw(im) for im in images], 224, OPENAI_MEAN, OPENAI_STD)
    smooth = clip_input([chw(im) for im in images], 224, OPENAI_MEAN, OPENAI_STD, antialias=True)
    assert default.shape == smooth.shape == (3, 3, 224, 224)
    for image, x, y in zip(images, default, smooth, strict=True):
        torch.testing.assert_close(x, reference_clip(image, 224, antialias=False))
        torch.testing.assert_close(y, reference_clip(image, 224, antialias=True))
    assert (default[0] - smooth[0]).abs().max() > 0.1  # a downscale: the two resizes really differ


def test_a_batch_equals_its_images_one_by_one():
    images = [chw(photo(h, w, seed=i)) for i, (h, w) in enumerate([(480, 640), (77, 300), (256, 128)])]
    sam = build_tiny_sam()
    sam_batch = sam_input(images, 256, sam.pixel_mean, sam.pixel_std)
    clip_batch = clip_input(images, 64, OPENAI_MEAN, OPENAI_STD)
    for i, image in enumerate(images):
        torch.testing.assert_close(sam_batch[i], sam_input([image], 256, sam.pixel_mean, sam.pixel_std)[0],
                                   rtol=0, atol=0)
        torch.testing.assert_close(clip_batch[i], clip_input([image], 64, OPENAI_MEAN, OPENAI_STD)[0],
                                   rtol=0, atol=0)


@pytest.mark.gpu
def test_preprocessing_on_cuda_equals_the_cpu():
    images = [chw(photo(h, w, seed=i)) for i, (h, w) in enumerate([(480, 640), (1500, 1100)])]
    on_gpu = [im.cuda() for im in images]
    for image, gpu in zip(images, on_gpu, strict=True):
        diff = (sam_resize(gpu, 1024).cpu().int() - sam_resize(image, 1024).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    torch.testing.assert_close(clip_input(on_gpu, 224, OPENAI_MEAN, OPENAI_STD).cpu(),
                               clip_input(images, 224, OPENAI_MEAN, OPENAI_STD), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sam_tokens_from_the_device_preprocessing_equal_the_library_path():
    """vit_b widths at 1024 px (two blocks: the preprocessing, not the depth, is under test)."""
    from segment_anything import SamPredictor
    from segment_anything.build_sam import _build_sam

    from regionspot.models.sam import SamRegionEncoder

    torch.manual_seed(0)
    encoder = SamRegionEncoder(_build_sam(768, 2, 12, [1], checkpoint=None))
    image = photo(1100, 1500, seed=7)  # a downscale: the resize really differs from PIL's here and there
    boxes = [torch.tensor([[100.0, 200, 700, 900], [0, 0, 1500, 1100], [1200, 50, 1490, 300]])]
    sizes = [(1100, 1500)]
    predictor = SamPredictor(encoder.sam)
    predictor.set_image(image)  # ResizeLongestSide.apply_image (PIL), Sam.preprocess, the image encoder
    with torch.inference_mode():
        batch = sam_input([chw(image)], 1024, encoder.sam.pixel_mean, encoder.sam.pixel_std)
        ours = encoder.region_tokens(encoder.sam.image_encoder(batch), boxes, sizes)[0]
        library = encoder.region_tokens(predictor.features, boxes, sizes)[0]
    stored = {name: (getattr(ours, name).half().float(), getattr(library, name).half().float())
              for name in ("tokens", "iou")}
    for name, (a, b) in stored.items():  # as stored (float16): within a few units of its last place
        torch.testing.assert_close(a, b, rtol=2**-8, atol=2**-12, msg=lambda m, name=name: f"{name}: {m}")
