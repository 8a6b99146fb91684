"""Paints synthetic illustrations from two independent latent factors.

* A **painting style** decides colours and texture only: background, fill palette,
  line colour and weight, hatching/halftone pattern, blur and grain. It shows in
  colour and texture statistics, never in shapes.
* A **content** decides shapes only: which subject is drawn (moon, star, house, ...),
  where and how large. Fill colours are drawn from the style's palette, so content
  carries no colour signal.

That split is what the dual image encoder must recover: e_STY should group by style,
e_SEM by content.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Style:
    name: str
    background: tuple[int, int, int]
    palette: tuple[tuple[int, int, int], ...]
    line: tuple[int, int, int]
    line_weight: float  # in pixels at 64 px; scales with image size
    pattern: str  # "none" | "hatch" | "halftone"
    pattern_angle_deg: float
    pattern_period: float  # pixels at 64 px
    pattern_amplitude: float  # added to luminance, 0-255 scale
    blur: float  # gaussian sigma at 64 px
    grain: float  # gaussian noise sigma, 0-255 scale


STYLES: tuple[Style, ...] = (
    Style(
        "pastel-watercolour",
        (246, 236, 228),
        ((240, 170, 190), (190, 170, 235), (170, 215, 230), (250, 210, 160)),
        (150, 120, 140),
        1.0,
        "none",
        0,
        1,
        0,
        1.3,
        4,
    ),
    Style(
        "ink-hatching",
        (232, 226, 208),
        ((70, 70, 70), (130, 115, 95), (175, 165, 150), (40, 35, 30)),
        (10, 10, 10),
        3.0,
        "hatch",
        45,
        3.0,
        45,
        0.0,
        4,
    ),
    Style(
        "neon-cel",
        (22, 12, 44),
        ((0, 240, 255), (255, 40, 200), (250, 250, 60), (120, 255, 120)),
        (255, 255, 255),
        2.0,
        "none",
        0,
        1,
        0,
        0.0,
        0,
    ),
    Style(
        "earthy-crayon",
        (196, 168, 118),
        ((120, 80, 40), (90, 120, 50), (170, 110, 60), (220, 190, 120)),
        (60, 40, 20),
        2.0,
        "hatch",
        0,
        2.0,
        28,
        0.0,
        20,
    ),
    Style(
        "blueprint",
        (24, 56, 128),
        ((160, 200, 245), (110, 150, 220), (200, 225, 255), (70, 110, 190)),
        (230, 240, 255),
        1.0,
        "hatch",
        90,
        8.0,
        14,
        0.0,
        3,
    ),
    Style(
        "pop-halftone",
        (252, 228, 40),
        ((230, 30, 40), (20, 20, 20), (250, 250, 250), (30, 90, 220)),
        (0, 0, 0),
        3.0,
        "halftone",
        0,
        5.0,
        40,
        0.0,
        0,
    ),
)


@dataclass(frozen=True)
class Content:
    """A drawable subject and the concept it stands for (see :mod:`umair.sample.vocab`)."""

    name: str


CONTENTS: tuple[Content, ...] = tuple(
    Content(n) for n in ("moon", "star", "house", "tree", "sword", "flower", "cat", "mountain")
)


def _tri(u: np.ndarray, v: np.ndarray, a, b, c) -> np.ndarray:
    """Mask of points inside triangle abc (any orientation)."""

    def side(p, q):
        return (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0])

    s1, s2, s3 = side(a, b), side(b, c), side(c, a)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _disc(u, v, cx, cy, r):
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _rect(u, v, x0, x1, y0, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def content_parts(name: str, u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the subject's parts in normalised coordinates (v grows downwards)."""
    if name == "moon":
        return [_disc(u, v, 0, 0, 0.6) & ~_disc(u, v, 0.3, -0.15, 0.5)]
    if name == "star":
        r = np.hypot(u, v)
        th = np.arctan2(v, u) + np.pi / 2
        edge = 0.28 + 0.42 * np.abs(np.cos(2.5 * th)) ** 3
        return [r <= edge]
    if name == "house":
        return [_rect(u, v, -0.45, 0.45, -0.05, 0.6), _tri(u, v, (-0.6, -0.05), (0.6, -0.05), (0, -0.6))]
    if name == "tree":
        return [
            _rect(u, v, -0.08, 0.08, 0.25, 0.7),
            _tri(u, v, (-0.5, 0.3), (0.5, 0.3), (0, -0.2)) | _tri(u, v, (-0.4, 0.0), (0.4, 0.0), (0, -0.65)),
        ]
    if name == "sword":
        blade = _tri(u, v, (-0.11, -0.5), (0.11, -0.5), (0, -0.8)) | _rect(u, v, -0.11, 0.11, -0.5, 0.3)
        return [blade, _rect(u, v, -0.36, 0.36, 0.3, 0.44), _rect(u, v, -0.07, 0.07, 0.44, 0.75)]
    if name == "flower":
        petals = np.zeros_like(u, dtype=bool)
        for k in range(6):
            a = 2 * np.pi * k / 6
            petals |= _disc(u, v, 0.38 * np.cos(a), 0.38 * np.sin(a), 0.22)
        return [petals, _disc(u, v, 0, 0, 0.2)]
    if name == "cat":
        ears = _tri(u, v, (-0.5, -0.1), (-0.15, -0.35), (-0.45, -0.7)) | _tri(
            u, v, (0.5, -0.1), (0.15, -0.35), (0.45, -0.7)
        )
        return [ears, _disc(u, v, 0, 0.1, 0.48)]
    if name == "mountain":
        return [
            _tri(u, v, (-0.8, 0.55), (0.3, 0.55), (-0.25, -0.45)),
            _tri(u, v, (-0.1, 0.55), (0.85, 0.55), (0.4, -0.15)),
        ]
    raise KeyError(f"unknown content {name!r}")


TARGET_AREA = 0.18  # fraction of the [-1, 1]^2 square every subject covers


@cache
def _size_factor(name: str) -> float:
    """Scale that gives every subject the same area, so area says nothing about content."""
    v, u = np.mgrid[-1:1:256j, -1:1:256j]
    covered = np.zeros_like(u, dtype=bool)
    for part in content_parts(name, u, v):
        covered |= part
    return float(np.sqrt(TARGET_AREA / covered.mean()))


def paint(style: Style, content: Content, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Render one illustration as an (height, width, 3) uint8 RGB array."""
    scale = min(height, width) / 64.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Composition: random placement, size and tilt of the subject (content-independent).
    cx, cy = rng.uniform(-0.2, 0.2, size=2)
    size = rng.uniform(0.85, 1.05) * _size_factor(content.name)
    tilt = np.deg2rad(rng.uniform(-20, 20))
    x = (xx - width / 2) / (min(height, width) / 2)
    y = (yy - height / 2) / (min(height, width) / 2)
    x, y = (x - cx) / size, (y - cy) / size
    u = np.cos(tilt) * x + np.sin(tilt) * y
    v = -np.sin(tilt) * x + np.cos(tilt) * y

    img = np.empty((height, width, 3), np.float32)
    img[:] = style.background
    palette = np.asarray(style.palette, np.float32)
    # Clutter: small discs anywhere, same distribution for every content.
    for _ in range(rng.integers(0, 3)):
        bx, by = rng.uniform(-0.9, 0.9, size=2)
        m = (x * size + cx - bx) ** 2 + (y * size + cy - by) ** 2 <= rng.uniform(0.05, 0.12) ** 2
        img[m] = palette[rng.integers(len(palette))]
    union = np.zeros((height, width), bool)
    weight = max(1, int(round(style.line_weight * scale)))
    for part in content_parts(content.name, u, v):
        img[part] = palette[rng.integers(len(palette))]
        union |= part
        edge = part & ~ndimage.binary_erosion(part, iterations=weight)
        img[edge] = style.line
    # Texture: pattern on luminance, blur, grain.
    period = max(1.5, style.pattern_period * scale)
    if style.pattern == "hatch":
        a = np.deg2rad(style.pattern_angle_deg)
        phase = (xx * np.cos(a) + yy * np.sin(a)) / period
        img += (style.pattern_amplitude * np.sign(np.sin(2 * np.pi * phase)))[..., None]
    elif style.pattern == "halftone":
        dots = (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.5
        img -= (style.pattern_amplitude * dots)[..., None]
    if style.blur > 0:
        img = ndimage.gaussian_filter(img, sigma=(style.blur * scale, style.blur * scale, 0))
    if style.grain > 0:
        img += rng.normal(0, style.grain, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
