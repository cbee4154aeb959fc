"""PIL drawing shared by the pictures: a colour map, tiled grids with captions, line panels.

Everything here takes and returns PIL images or numpy arrays; no torch. Sizes are exact and
computable in advance (`grid_size`), so callers and tests know what a figure measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GREY: RGB = (120, 120, 120)
LIGHT: RGB = (225, 225, 225)
GOOD: RGB = (0, 128, 0)
BAD: RGB = (200, 0, 0)
# Distinct line colours (the usual "tab10" first five).
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
)

# viridis at 8 evenly spaced points: perceptually uniform, readable in grey and by most
# colour-blind readers; linear interpolation between them is indistinguishable by eye.
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (70, 51, 126),
        (54, 92, 141),
        (39, 127, 142),
        (31, 161, 135),
        (74, 193, 109),
        (159, 218, 58),
        (253, 231, 37),
    ],
    dtype=np.float64,
)

PAD = 6
FONT_SIZE = 12


@cache
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def line_height(size: int = FONT_SIZE) -> int:
    box = font(size).getbbox("Hg")
    return int(box[3] - min(box[1], 0)) + 2


def text_width(text: str, size: int = FONT_SIZE) -> int:
    box = font(size).getbbox(text)
    return int(box[2] - box[0])


def fit_text(text: str, width: int, size: int = FONT_SIZE) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if text_width(text, size) <= width:
        return text
    while text and text_width(text + "…", size) > width:
        text = text[:-1]
    return text + "…"


# ------------------------------------------------------------------------------ colour map


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)) on viridis."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    pos = v * (len(_VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t
    return np.round(rgb).astype(np.uint8)


def normalise01(x: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a constant map is all zeros (nothing stands out)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend the colour-mapped `heat` (H, W in [0, 1]) over `image` (H, W, 3 uint8)."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"heat map {heat.shape} does not match the image {image.shape[:2]}")
    mixed = (1 - alpha) * image.astype(np.float64) + alpha * colormap(heat)
    return np.round(mixed).clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ tiled grids


@dataclass
class Cell:
    image: Image.Image | None  # None: an empty cell
    caption: str = ""
    color: RGB = BLACK


def fit_tile(image: Image.Image, tile: int) -> Image.Image:
    """`image` scaled to fit a `tile` x `tile` square (aspect kept), centred on white.

    Upscaling by 2x or more uses nearest neighbour: small training images and patch-sized
    attention blocks stay crisp instead of smeared."""
    w, h = image.size
    scale = tile / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC
    scaled = image.convert("RGB").resize(size, resample)
    out = Image.new("RGB", (tile, tile), WHITE)
    out.paste(scaled, ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return out


def grid_size(rows: int, cols: int, tile: int, title: bool) -> tuple[int, int]:
    """(width, height) of `compose_grid` for that many rows and columns."""
    width = cols * tile + (cols + 1) * PAD
    title_h = line_height(FONT_SIZE + 2) + PAD if title else 0
    height = title_h + rows * (tile + line_height()) + (rows + 1) * PAD
    return width, height


def compose_grid(rows: Sequence[Sequence[Cell]], tile: int, title: str = "") -> Image.Image:
    """Cells as a grid of `tile`-px squares, each with a one-line caption below it."""
    if not rows or not any(rows):
        raise ValueError("a grid needs at least one cell")
    cols = max(len(r) for r in rows)
    width, height = grid_size(len(rows), cols, tile, bool(title))
    out = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(out)
    y = PAD
    if title:
        draw.text(
            (PAD, y), fit_text(title, width - 2 * PAD, FONT_SIZE + 2), BLACK, font(FONT_SIZE + 2)
        )
        y += line_height(FONT_SIZE + 2)
    for row in rows:
        for i, cell in enumerate(row):
            x = PAD + i * (tile + PAD)
            if cell.image is not None:
                out.paste(fit_tile(cell.image, tile), (x, y))
            if cell.caption:
                text = fit_text(cell.caption, tile)
                draw.text((x, y + tile + 1), text, cell.color, font())
        y += tile + line_height() + PAD
    return out


# ------------------------------------------------------------------------------ line panels


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]  # non-finite values break the line
    color: RGB = PALETTE[0]
    markers: bool = False


@dataclass
class HLine:
    y: float
    label: str
    color: RGB = GREY


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    empty_text: str = "no data"
    lines: list[str] = field(default_factory=list)  # a text panel: no axes, these lines


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick positions (1, 2, 2.5, 5 x 10^k apart) covering [lo, hi], about `n` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(count)]


def tick_label(value: float, step: float) -> str:
    """`value` with as many decimals as the tick spacing `step` needs."""
    step = abs(step) or 1.0
    if abs(value) < step * 1e-6:
        return "0"
    if step >= 1e-3 and abs(value) < 1e7:
        decimals = max(0, -math.floor(math.log10(step)))
        if abs(round(step, decimals) - step) > step * 1e-6:
            decimals += 1  # 0.25, 2.5: one digit more than the magnitude says
        return f"{value:.{decimals}f}"
    return f"{value:.3g}"


def _y_range(panel: Panel) -> tuple[float, float] | None:
    ys = [y for s in panel.series for y in s.ys if math.isfinite(y)]
    ys += [h.y for h in panel.hlines if math.isfinite(h.y)]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def draw_panel(
    image: Image.Image, box: tuple[int, int, int, int], panel: Panel, x_range: tuple[float, float]
) -> None:
    """One titled line chart inside `box` (left, top, right, bottom), x shared by the caller."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    draw.text((left + 4, top + 2), panel.title, BLACK, font(FONT_SIZE + 1))
    area = (left + 64, top + line_height(FONT_SIZE + 1) + 8, right - 12, bottom - 34)
    x0, y0, x1, y1 = area
    if panel.lines and not panel.series:
        for i, line in enumerate(panel.lines):
            draw.text((x0, y0 + i * line_height()), fit_text(line, x1 - x0), BLACK, font())
        return
    draw.rectangle(area, outline=GREY)
    y_range = _y_range(panel)
    if y_range is None or x1 - x0 < 20 or y1 - y0 < 20:
        msg = panel.empty_text
        draw.text(((x0 + x1 - text_width(msg)) / 2, (y0 + y1) / 2 - 6), msg, GREY, font())
        return
    (xa, xb), (ya, yb) = x_range, y_range

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - xa) / (xb - xa) if xb > xa else 0.5
        return x0 + fx * (x1 - x0), y1 - (y - ya) / (yb - ya) * (y1 - y0)

    _axes(draw, area, x_range, y_range, px)
    for h in panel.hlines:
        sy = px(xa, h.y)[1]
        _dashed(draw, sy, x0, x1, h.color)
        label_y = sy - 15 if sy - 15 > y0 + 2 else sy + 3  # above the line, unless at the top
        draw.text((x1 - text_width(h.label) - 4, label_y), h.label, h.color, font())
    for s in panel.series:
        _series(draw, s, px)
        # where a value was NaN/inf: a red tick on the x axis (the line has a gap there)
        for x, y in zip(s.xs, s.ys, strict=True):
            if math.isfinite(x) and not math.isfinite(y):
                sx = px(x, ya)[0]
                draw.line([(sx, y1 - 7), (sx, y1)], BAD, width=2)
    _legend(draw, panel, area)


def _axes(draw: ImageDraw.ImageDraw, area, x_range, y_range, px) -> None:  # noqa: ANN001
    x0, y0, x1, y1 = area
    xt = nice_ticks(*x_range, n=6)
    for x in xt:
        sx = px(x, y_range[0])[0]
        draw.line([(sx, y0 + 1), (sx, y1 - 1)], LIGHT)
        label = tick_label(x, xt[1] - xt[0] if len(xt) > 1 else x)
        draw.text((sx - text_width(label) / 2, y1 + 4), label, BLACK, font())
    yt = nice_ticks(*y_range, n=5)
    for y in yt:
        sy = px(x_range[0], y)[1]
        draw.line([(x0 + 1, sy), (x1 - 1, sy)], LIGHT)
        label = tick_label(y, yt[1] - yt[0] if len(yt) > 1 else y)
        draw.text((x0 - text_width(label) - 5, sy - 7), label, BLACK, font())
    draw.text(((x0 + x1 - text_width("step")) / 2, y1 + 18), "step", GREY, font())


def _dashed(draw: ImageDraw.ImageDraw, y: float, x0: float, x1: float, color: RGB) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + 6, x1), y)], color, width=1)
        x += 10


def _series(draw: ImageDraw.ImageDraw, s: Series, px) -> None:  # noqa: ANN001
    run: list[tuple[float, float]] = []
    points = [(x, y) for x, y in zip(s.xs, s.ys, strict=True)]
    for x, y in [*points, (math.nan, math.nan)]:
        if math.isfinite(x) and math.isfinite(y):
            run.append(px(x, y))
            continue
        if len(run) > 1:
            draw.line(run, s.color, width=2)
        if s.markers or len(run) == 1:  # a lone point would otherwise be invisible
            for cx, cy in run:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=s.color)
        run = []


def _legend(draw: ImageDraw.ImageDraw, panel: Panel, area) -> None:  # noqa: ANN001
    named = [s for s in panel.series if s.label]
    if len(named) < 2:
        return
    x0, y0, x1, _ = area
    width = max(text_width(s.label) for s in named) + 26
    left = x1 - width - 6
    draw.rectangle([left, y0 + 6, x1 - 6, y0 + 10 + 15 * len(named)], fill=WHITE, outline=LIGHT)
    for i, s in enumerate(named):
        y = y0 + 9 + 15 * i
        draw.line([(left + 4, y + 7), (left + 18, y + 7)], s.color, width=2)
        draw.text((left + 22, y), s.label, BLACK, font())


def draw_panels(
    panels: Sequence[Panel],
    size: tuple[int, int],
    columns: int,
    x_range: tuple[float, float],
    title: str = "",
) -> Image.Image:
    """Panels in a grid of `columns` filling a `size` image, under an optional title."""
    width, height = size
    out = Image.new("RGB", size, WHITE)
    top = 0
    if title:
        ImageDraw.Draw(out).text((PAD, PAD), fit_text(title, width - 2 * PAD, 14), BLACK, font(14))
        top = line_height(14) + 2 * PAD
    rows = math.ceil(len(panels) / columns)
    cell_w, cell_h = width // columns, (height - top) // max(rows, 1)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        box = (c * cell_w, top + r * cell_h, (c + 1) * cell_w, top + (r + 1) * cell_h)
        draw_panel(out, box, panel, x_range)
    return out
