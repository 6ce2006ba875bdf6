"""Pictures of named regions: masks, boxes and "label score" captions; attention heat maps.

Plain PIL + numpy (no matplotlib). Every function takes and returns uint8 HxWx3 RGB arrays in the
original image's pixel frame; boxes are XYXY pixels of that frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Tableau 10 followed by ten further distinct hues: neighbouring labels stay far apart in colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (0, 92, 49), (255, 204, 0), (0, 0, 160), (255, 80, 160), (0, 200, 120),
    (160, 0, 0), (90, 200, 255), (120, 60, 0), (200, 150, 255), (60, 60, 60),
)  # fmt: skip

# Anchors of a perceptually ordered colour map (dark -> blue -> green -> yellow -> red).
_HEAT_ANCHORS = np.array(
    [[0, 0, 32], [30, 40, 180], [20, 160, 200], [60, 200, 80], [250, 220, 40], [240, 60, 20], [160, 0, 0]],
    np.float32,
)


def label_colors(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """One colour per distinct label, in order of first appearance (distinct for up to 20 labels)."""
    colors: dict[str, tuple[int, int, int]] = {}
    for label in labels:
        if label not in colors:
            colors[label] = PALETTE[len(colors) % len(PALETTE)]
    return colors


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 ships a scalable default font when FreeType is present
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text)
    return x1 - min(x0, 0), y1


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _scale(width: int, height: int) -> tuple[int, int]:
    """(font size, line width) for a picture of this size: legible on thumbnails and on 4K photos."""
    short = min(width, height)
    return int(np.clip(round(short / 30), 11, 64)), int(np.clip(round(short / 300), 1, 8))


def _fit_caption(font_size: int, text: str, max_width: int):
    """The largest font (down to 8 px) that fits `text` within `max_width`, truncating as a last resort."""
    size = font_size
    while size > 8 and _text_size(_font(size), text)[0] > max_width:
        size -= 1
    font = _font(size)
    while len(text) > 1 and _text_size(font, text)[0] > max_width:
        text = text[:-2] + "…"
    return font, text


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place(box, size, width, height, taken) -> tuple[int, int]:
    """Top-left corner of a caption of `size` for `box`: above the box, else inside its top, else below
    it, else inside its bottom, the first spot that overlaps no earlier caption; always inside the
    picture."""
    tw, th = size
    x0, y0, x1, y1 = box
    x = int(np.clip(x0, 0, max(width - tw, 0)))
    candidates = [y0 - th, y0, y1, y1 - th]
    spots = [(x, int(np.clip(y, 0, max(height - th, 0)))) for y in candidates]
    for sx, sy in spots:
        if not any(_overlaps((sx, sy, sx + tw, sy + th), t) for t in taken):
            return sx, sy
    return spots[0]


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` of its outside (the outline drawn over the filled mask)."""
    inner = mask.copy()
    for _ in range(max(width, 1)):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def caption(label: str, score: float | None) -> str:
    """The text drawn for a region: `"label 0.93"`."""
    return label if score is None else f"{label} {score:.2f}"


def draw_regions(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    colors: dict[str, tuple[int, int, int]] | None = None,
    mask_alpha: float = 0.45,
) -> np.ndarray:
    """The image with each region's mask, box and "label score" caption, a colour per label.

    Args:
        image: uint8 [H, W, 3] RGB.
        boxes: [N, 4] XYXY pixels of the image.
        labels: N label strings; scores: N floats or None (captions show the label only).
        masks: N bool [H, W] arrays (or None entries), or None for no masks.
        colors: label -> RGB; default `label_colors(labels)`.
    Returns:
        uint8 [H, W, 3] RGB, a new array.
    """
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    colors = colors or label_colors(labels)
    font_size, line = _scale(width, height)
    out = image.astype(np.float32).copy()
    # largest regions first, so small ones stay visible on top of them
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")
    if masks is not None:
        for i in order:
            mask = masks[i]
            if mask is None:
                continue
            mask = np.asarray(mask, bool)
            color = np.array(colors[labels[i]], np.float32)
            out[mask] = out[mask] * (1 - mask_alpha) + color * mask_alpha
            out[_boundary(mask, line)] = color
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in order:
        x0, y0, x1, y1 = boxes[i].tolist()
        draw.rectangle((x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)), outline=colors[labels[i]], width=line)
    taken: list[tuple[int, int, int, int]] = []
    pad = max(1, font_size // 6)
    for i in range(len(boxes)):  # captions last and in prompt order, never covered by a mask or box
        text = caption(labels[i], None if scores is None else float(scores[i]))
        font, text = _fit_caption(font_size, text, width - 2 * pad)
        tw, th = _text_size(font, text)
        size = (tw + 2 * pad, th + 2 * pad)
        x, y = _place(boxes[i].tolist(), size, width, height, taken)
        taken.append((x, y, x + size[0], y + size[1]))
        color = colors[labels[i]]
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=color)
        draw.text((x + pad, y + pad), text, fill=_text_color(color), font=font)
    return np.asarray(picture)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (shape + (3,)) with a dark-to-red colour map."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0, 1) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(v).astype(np.int64).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (v - low)[..., None]
    return (_HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac).round().astype(np.uint8)


def attention_map(attention: np.ndarray, width: int, height: int) -> np.ndarray:
    """One region's attention over the CLIP token map as a [height, width] float map in [0, 1].

    Args:
        attention: [L] weights over the CLIP map, class token first, then g x g patches row-major.
            CLIP saw the whole image resized to S x S (aspect ratio not kept), so the patch grid
            stretches over the full picture.
    """
    attention = np.asarray(attention, np.float32).reshape(-1)
    grid = math.isqrt(len(attention) - 1)
    if grid * grid != len(attention) - 1:
        raise ValueError(f"attention has {len(attention)} entries, not 1 + g*g")
    patches = attention[1:].reshape(grid, grid)  # (g, g): the class token has no place in the picture
    low, high = float(patches.min()), float(patches.max())
    patches = (patches - low) / (high - low) if high > low else np.zeros_like(patches)
    heat = Image.fromarray(patches.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return np.clip(np.asarray(heat), 0, 1)


def draw_attention(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None,
    attention: np.ndarray,
    colors: dict[str, tuple[int, int, int]] | None = None,
    panel_size: int | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """A grid of panels, one per region: its attention heat map over the (dimmed) image, its box and
    a "#i: label score" title. The paper's Figure 4.

    Args:
        image: uint8 [H, W, 3] RGB.
        boxes: [N, 4] XYXY pixels of the image.
        attention: [N, L] per region, the head's last-layer cross-attention over the CLIP map.
        panel_size: the longest side of a panel in pixels (default: smaller as N grows, 192..480).
    Returns:
        uint8 RGB picture of ceil(N / cols) x cols panels (the plain image when N = 0).
    """
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    attention = np.asarray(attention, np.float32).reshape(len(boxes), -1) if len(boxes) else attention
    n = len(boxes)
    if n == 0:
        return image.copy()
    colors = colors or label_colors(labels)
    cols = min(n, max(1, math.ceil(math.sqrt(n))), 6)
    rows = math.ceil(n / cols)
    longest = panel_size or int(np.clip(1440 // cols, 192, 480))
    scale = min(1.0, longest / max(width, height))
    pw, ph = max(1, round(width * scale)), max(1, round(height * scale))
    base = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BILINEAR), np.float32)
    gray = base.mean(axis=2, keepdims=True) * 0.6  # (ph, pw, 1): colour would fight the heat map
    font_size, _ = _scale(max(pw, 160), max(ph, 160))
    title_h = _text_size(_font(font_size), "Ag")[1] + 6
    gap = 4
    sheet = Image.new(
        "RGB", (cols * pw + (cols - 1) * gap, rows * (ph + title_h) + (rows - 1) * gap), "white"
    )
    for i in range(n):
        heat = attention_map(attention[i], pw, ph)[..., None]  # (ph, pw, 1)
        panel = gray * (1 - alpha * heat) + heat_colors(heat[..., 0]).astype(np.float32) * (alpha * heat)
        panel_img = Image.fromarray(panel.round().clip(0, 255).astype(np.uint8))
        color = colors[labels[i]]
        x0, y0, x1, y1 = (boxes[i] * scale).tolist()
        rect = (x0, y0, max(x1 - 1, x0), max(y1 - 1, y0))
        panel_draw = ImageDraw.Draw(panel_img)
        panel_draw.rectangle(rect, outline=(255, 255, 255), width=4)  # a white rim keeps it visible on red
        panel_draw.rectangle(rect, outline=color, width=2)
        title = Image.new("RGB", (pw, title_h), color)
        text = f"#{i}: " + caption(labels[i], None if scores is None else float(scores[i]))
        font, text = _fit_caption(font_size, text, pw - 6)
        ImageDraw.Draw(title).text((3, 3), text, fill=_text_color(color), font=font)
        r, c = divmod(i, cols)
        x, y = c * (pw + gap), r * (ph + title_h + gap)
        sheet.paste(title, (x, y))
        sheet.paste(panel_img, (x, y + title_h))
    return np.asarray(sheet)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB array as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(picture)).save(path, format="PNG")
    return path
