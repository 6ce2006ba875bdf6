"""Pictures of named regions: masks, boxes, clicked points and "label score" captions; attention heat maps.

Plain PIL + numpy (no matplotlib). Functions take uint8 HxWx3 RGB arrays and boxes as XYXY pixels of
that image. Each region has its own colour (its mask, outline, point and caption tab), so regions of
one class stay apart; the caption tab also carries a swatch of the label's colour, so regions of one
class are still seen together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

# Tableau 10 (its grey made teal: greys vanish on photos) followed by ten further distinct hues:
# neighbouring indices stay far apart in colour.
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (0, 128, 128), (188, 189, 34), (23, 190, 207),
    (0, 92, 49), (255, 204, 0), (0, 0, 160), (255, 80, 160), (0, 200, 120),
    (160, 0, 0), (90, 200, 255), (120, 60, 0), (200, 150, 255), (255, 150, 90),
)  # fmt: skip
HALO: RGB = (0, 0, 0)  # drawn around outlines and markers: they stay visible over any mask colour

# Anchors of a perceptually ordered colour map (dark -> blue -> green -> yellow -> red).
_HEAT_ANCHORS = np.array(
    [[0, 0, 32], [30, 40, 180], [20, 160, 200], [60, 200, 80], [250, 220, 40], [240, 60, 20], [160, 0, 0]],
    np.float32,
)


def region_colors(n: int) -> list[RGB]:
    """A colour per region, by its index (the same region index gets the same colour in every picture)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def label_colors(labels: Sequence[str]) -> dict[str, RGB]:
    """A colour per distinct label, in order of first appearance (distinct for up to 20 labels). Labels
    take the palette from its far end, so the first label's swatch never matches the first region."""
    colors: dict[str, RGB] = {}
    for label in labels:
        if label not in colors:
            colors[label] = PALETTE[-1 - len(colors) % len(PALETTE)]
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


def _text_color(background: RGB) -> RGB:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _scale(width: int, height: int) -> tuple[int, int]:
    """(font size, line width) for a picture of this size: legible on thumbnails and on 4K photos."""
    short = min(width, height)
    return int(np.clip(round(short / 30), 12, 64)), int(np.clip(round(short / 200), 1, 8))


def _fit_caption(font_size: int, text: str, max_width: int):
    """The largest font (down to 8 px) that fits `text` within `max_width`, truncating as a last resort."""
    size = font_size
    while size > 8 and _text_size(_font(size), text)[0] > max_width:
        size -= 1
    font = _font(size)
    while len(text) > 1 and _text_size(font, text)[0] > max_width:
        text = text[:-2] + "…"
    return font, text


def _overlap(a, b) -> float:
    """Area shared by two XYXY rectangles."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _place(box, size, width, height, taken) -> tuple[int, int]:
    """Top-left corner of a caption tab of `size` for `box`, inside the picture, overlapping no earlier
    tab where possible: above the box (at its left end, then shifted along it to its right end), inside
    its top, below it, inside its bottom, then stacked further above or below; else the spot with the
    least overlap."""
    tw, th = size
    x0, y0, x1, y1 = box
    xs = [x0] + [x0 + f * (x1 - x0 - tw) for f in (0.5, 1.0) if x1 - x0 > tw]
    ys = [y0 - th, y0, y1, y1 - th] + [y0 - th * k for k in (2, 3, 4)] + [y1 + th * k for k in (1, 2, 3)]
    spots = []
    for y in ys:
        for x in xs:
            spot = (int(np.clip(x, 0, max(width - tw, 0))), int(np.clip(y, 0, max(height - th, 0))))
            if spot not in spots:
                spots.append(spot)
    cost = [sum(_overlap((x, y, x + tw, y + th), t) for t in taken) for x, y in spots]
    return spots[int(np.argmin(cost))]  # the first spot without overlap when there is one


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


def _outline(draw: ImageDraw.ImageDraw, box, color: RGB, line: int) -> None:
    """A box outline `line` px wide with a dark halo on both sides (visible over dense masks)."""
    x0, y0, x1, y1 = box
    x1, y1 = max(x1 - 1, x0), max(y1 - 1, y0)
    halo = max(1, line // 2)
    draw.rectangle((x0 - halo, y0 - halo, x1 + halo, y1 + halo), outline=HALO, width=line + 2 * halo)
    draw.rectangle((x0, y0, x1, y1), outline=color, width=line)


def point_radius(width: int, height: int) -> int:
    """The radius of a clicked-point marker in a picture of this size."""
    return max(5, round(min(width, height) / 100))


def _point(draw: ImageDraw.ImageDraw, xy, color: RGB, radius: int) -> None:
    """A clicked point: a dot of the region's colour in a white ring with a dark rim."""
    x, y = xy
    for r, fill in ((radius + max(1, radius // 3), HALO), (radius, (255, 255, 255)), (radius * 0.6, color)):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def legible_factor(width: int, height: int, min_side: int) -> int:
    """The integer factor that brings a picture's short side to at least `min_side` (1: keep its size)."""
    return max(1, math.ceil(min_side / max(1, min(width, height)))) if min_side else 1


def draw_regions(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    points: Sequence[tuple[float, float] | None] | None = None,
    colors: Sequence[RGB] | None = None,
    mask_alpha: float = 0.45,
    min_side: int = 0,
) -> np.ndarray:
    """The image with each region's mask, box, clicked point and "label score" caption.

    Args:
        image: uint8 [H, W, 3] RGB.
        boxes: [N, 4] XYXY pixels of the image.
        labels: N label strings; scores: N floats or None (captions show the label only).
        masks: N bool [H, W] arrays (or None entries), or None for no masks.
        points: N (x, y) pixels of the click that made each region (or None entries), or None.
        colors: N RGB colours, one per region; default `region_colors(N)`.
        min_side: draw a small image enlarged by an integer factor until its short side is at least
            this many pixels, so captions stay legible (0: the image's own size).
    Returns:
        uint8 RGB, a new array: [H, W, 3], or [f*H, f*W, 3] for f = `legible_factor(W, H, min_side)`.
    """
    factor = legible_factor(image.shape[1], image.shape[0], min_side)
    if factor > 1:  # nearest-neighbour: the pixels stay the pixels the models saw
        image = image.repeat(factor, 0).repeat(factor, 1)
        masks = None if masks is None else [None if m is None else m.repeat(factor, 0).repeat(factor, 1)
                                            for m in masks]  # fmt: skip
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * factor
    n = len(boxes)
    colors = list(colors) if colors is not None else region_colors(n)
    swatches = label_colors(labels)
    font_size, line = _scale(width, height)
    out = image.astype(np.float32).copy()
    # largest regions first, so small ones stay visible on top of them
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")
    if masks is not None:
        for i in order:
            if masks[i] is None:
                continue
            mask = np.asarray(masks[i], bool)
            color = np.array(colors[i], np.float32)
            out[mask] = out[mask] * (1 - mask_alpha) + color * mask_alpha
            out[_boundary(mask, line)] = color
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in order:
        _outline(draw, boxes[i].tolist(), colors[i], line)
    if points is not None:
        radius = point_radius(width, height)
        for i in range(n):
            if points[i] is not None:
                _point(draw, (points[i][0] * factor, points[i][1] * factor), colors[i], radius)
    taken: list[tuple[int, int, int, int]] = []
    pad = max(1, font_size // 6)
    for i in range(n):  # captions last and in prompt order, never covered by a mask or box
        text = caption(labels[i], None if scores is None else float(scores[i]))
        swatch = font_size  # a square of the label's colour before the text
        font, text = _fit_caption(font_size, text, width - 3 * pad - swatch)
        tw, th = _text_size(font, text)
        size = (swatch + tw + 3 * pad, max(th, swatch) + 2 * pad)
        x, y = _place(boxes[i].tolist(), size, width, height, taken)
        taken.append((x, y, x + size[0], y + size[1]))
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=colors[i], outline=HALO)
        sy = y + (size[1] - swatch) // 2
        draw.rectangle((x + pad, sy, x + pad + swatch - 1, sy + swatch - 1), fill=swatches[labels[i]],
                       outline=_text_color(colors[i]))  # fmt: skip
        draw.text((x + 2 * pad + swatch, y + pad), text, fill=_text_color(colors[i]), font=font)
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


_DIM = 0.6  # the image under a heat map is grey and dimmed to this fraction
_GRAY = 128 * _DIM  # a mid-grey image pixel under the heat map, for the colour bar


def _header(width: int, font_size: int, alpha: float) -> Image.Image:
    """The attention sheet's header: what the panels show, and the colour bar of the heat map."""
    font = _font(font_size)
    text = "attention over the CLIP map, per region:"
    tw, th = _text_size(font, text)
    low, high = "low", "high (each panel scaled to its own max)"
    bar_w = int(np.clip(width // 4, 60, 240))
    height = th + 12
    full = tw + 8 + _text_size(font, low)[0] + 6 + bar_w + 6 + _text_size(font, high)[0] + 8
    if full > width:  # a narrow sheet: the colour bar and its labels only
        text, tw = "", -8
        high = "high"
    header = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(header)
    x, y = 4, 6
    if text:
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    x += tw + 8
    draw.text((x, y), low, fill=(0, 0, 0), font=font)
    x += _text_size(font, low)[0] + 6
    heat = np.linspace(0, 1, bar_w, dtype=np.float32)[None, :, None].repeat(th, 0)  # (th, bar_w, 1)
    ramp = _GRAY * (1 - alpha * heat) + heat_colors(heat[..., 0]).astype(np.float32) * (alpha * heat)
    header.paste(Image.fromarray(ramp.round().astype(np.uint8)), (x, y + 2))
    draw.rectangle((x - 1, y + 1, x + bar_w, y + th + 2), outline=(0, 0, 0))
    draw.text((x + bar_w + 6, y), high, fill=(0, 0, 0), font=font)
    return header


def draw_attention(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None,
    attention: np.ndarray,
    colors: Sequence[RGB] | None = None,
    panel_size: int | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """A grid of panels, one per region: its attention heat map over the (dimmed) image, its box and
    a "#i label score" title; a header with the heat map's colour bar. The paper's Figure 4.

    Args:
        image: uint8 [H, W, 3] RGB.
        boxes: [N, 4] XYXY pixels of the image.
        attention: [N, L] per region, the head's last-layer cross-attention over the CLIP map.
        colors: N RGB colours, one per region (those of `draw_regions`); default `region_colors(N)`.
        panel_size: the longest side of a panel in pixels (default: smaller as N grows, 256..480).
    Returns:
        uint8 RGB picture: the header, then ceil(N / cols) x cols panels (the plain image when N = 0).
    """
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    attention = np.asarray(attention, np.float32).reshape(len(boxes), -1) if len(boxes) else attention
    n = len(boxes)
    if n == 0:
        return image.copy()
    colors = list(colors) if colors is not None else region_colors(n)
    cols = min(n, max(1, math.ceil(math.sqrt(n))), 6)
    rows = math.ceil(n / cols)
    longest = panel_size or int(np.clip(1440 // cols, 256, 480))
    scale = longest / max(width, height)  # small images are enlarged too: the titles need the room
    pw, ph = max(1, round(width * scale)), max(1, round(height * scale))
    base = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BILINEAR), np.float32)
    gray = base.mean(axis=2, keepdims=True) * _DIM  # (ph, pw, 1): colour would fight the heat map
    font_size = int(np.clip(round(pw / 18), 14, 28))
    title_h = _text_size(_font(font_size), "Ag")[1] + 8
    gap = 6
    header = _header(cols * pw + (cols - 1) * gap, font_size, alpha)
    top = header.height + gap
    sheet = Image.new(
        "RGB", (cols * pw + (cols - 1) * gap, top + rows * (ph + title_h) + (rows - 1) * gap), "white"
    )
    sheet.paste(header, (0, 0))
    line = max(2, round(pw / 120))
    for i in range(n):
        heat = attention_map(attention[i], pw, ph)[..., None]  # (ph, pw, 1)
        panel = gray * (1 - alpha * heat) + heat_colors(heat[..., 0]).astype(np.float32) * (alpha * heat)
        panel_img = Image.fromarray(panel.round().clip(0, 255).astype(np.uint8))
        _outline(ImageDraw.Draw(panel_img), (boxes[i] * scale).tolist(), colors[i], line)
        title = Image.new("RGB", (pw, title_h), "white")
        title_draw = ImageDraw.Draw(title)
        swatch = title_h - 8
        title_draw.rectangle((2, 4, 2 + swatch, 4 + swatch), fill=colors[i], outline=HALO)
        text = f"#{i + 1} " + caption(labels[i], None if scores is None else float(scores[i]))
        font, text = _fit_caption(font_size, text, pw - swatch - 10)
        title_draw.text((swatch + 8, 4), text, fill=(0, 0, 0), font=font)
        r, c = divmod(i, cols)
        x, y = c * (pw + gap), top + r * (ph + title_h + gap)
        sheet.paste(title, (x, y))
        sheet.paste(panel_img, (x, y + title_h))
    return np.asarray(sheet)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB array as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(picture)).save(path, format="PNG")
    return path
