"""The embedded procedural world: the default datasets, made from nothing on any machine.

Four labeled tasks stand in for the seed paper's datasets ("shapes2" for cats_vs_dogs, "shapes5" for
tf_flowers, "shapes47" for DTD, "shapes100" for CIFAR-100 / Food-101) and "shapes-pool" holds
unlabeled images for pretraining. Class identity is carried by structure only (shape outline,
texture pattern); colour, position, scale, rotation, mirroring, clutter, lighting and noise vary
inside every class, so SimCLR's colour distortion matters as it does on natural images.

An object image holds one or two copies of its class's outline, each in its own place, size, turn
and mirroring, and each filled with its own two-tone texture (where the class allows several).
Every part of the image shows the class, while which textures, sizes and places it holds is a
per-image accident: as in a photo, where a crop shows part of an object, SimCLR's random crops make
two views share the class and not the layout, so cropping matters as in SimCLR v1's Figure 5.
Texture images (shapes47) are one texture over the whole frame.

Each image is rendered from a few dozen random numbers, vectorised over a chunk of images:
outlines are signed-distance functions (10 of them) in their own rotated, scaled, possibly
mirrored frames, textures are 47 periodic or noise patterns in second random frames, over a
cluttered background (colour blotches, stray lines, a lighting gradient), plus pixel noise. Edges
are anti-aliased from the signed distance and the pixel footprint, so every image size shows the
same scene at a different resolution.

Colours are drawn per image from a lightness / chroma / hue model in which the two texture tones
and the objects against their background always differ in lightness, so the structure survives
the grayscale and colour jitter of SimCLR; the class never depends on a colour.

data.py wraps ``generate`` into its containers (``data.load_task("shapes5")``); this file needs
only numpy (and options.py's UserError, for the message a command line prints; options.py needs only
the standard library).
"""
from __future__ import annotations

import zlib

import numpy as np

from options import UserError

_F = np.float32
_TAU = _F(2.0 * np.pi)
_SQRT3 = _F(np.sqrt(3.0))


def _near(x: np.ndarray) -> np.ndarray:
    """Distance to the nearest integer, in [0, 0.5]."""
    return np.abs(x - np.rint(x))


def _cover(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region d < 0 for a pixel of width w (same units as d)."""
    return np.clip(_F(0.5) - d / w, _F(0.0), _F(1.0))


def _cell_hash(i: np.ndarray, j: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) value per integer lattice cell (i, j); integer arithmetic, so exact everywhere."""
    h = (i.astype(np.int64) * 1640531513 + j.astype(np.int64) * 2654435761 + salt) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 2246822519) & 0xFFFFFFFF
    h ^= h >> 13
    return (h & 0xFFFFFF).astype(_F) * _F(1.0 / (1 << 24))


def _hex_offset(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset from the nearest point of the triangular lattice with unit spacing (rows along p)."""
    qs = q / _SQRT3
    a1, b1 = p - np.rint(p), (qs - np.rint(qs)) * _SQRT3
    p2, q2 = p - _F(0.5), qs - _F(0.5)
    a2, b2 = p2 - np.rint(p2), (q2 - np.rint(q2)) * _SQRT3
    first = a1 * a1 + b1 * b1 <= a2 * a2 + b2 * b2
    return np.where(first, a1, a2), np.where(first, b1, b2)


def _waves(p: np.ndarray, q: np.ndarray, e: np.ndarray, count: int, freq: float) -> np.ndarray:
    """Sum of ``count`` plane waves, directions spread over a half turn with per-image jitter,
    frequencies within +-25% of ``freq``, random phases: a smooth random field in [-count, count]."""
    f = None
    for k in range(count):
        ang = (e[:, 0, None, None] + _F(k / count) * _F(0.5) + e[:, k + 1, None, None] * _F(0.12)) * _TAU
        ph = e[:, k + 4, None, None] * _TAU
        fk = _F(freq * 2 * np.pi) * (_F(0.75) + _F(0.5) * e[:, (k + 3) % 8, None, None])
        wave = np.cos((p * np.cos(ang) + q * np.sin(ang)) * fk + ph)
        f = wave if f is None else f + wave
    return f


# Textures: t(p, q) in [0, 1] in texture units (one period = 1), w = pixel width in those units,
# e = (n, 8) per-image uniforms (phases, directions, hash salts). Names are the class names.


def _tx_solid(p, q, w, e):
    return np.zeros_like(p)


def _tx_stripes(p, q, w, e):
    return _cover(_near(p) - _F(0.25), w)


def _tx_lines(p, q, w, e):
    return _cover(_near(p) - _F(0.09), w)


def _tx_double_lines(p, q, w, e):
    return _cover(np.minimum(_near(p), _near(p - _F(0.24))) - _F(0.06), w)


def _tx_waves(p, q, w, e):
    return _cover(_near(p + _F(0.22) * np.sin(q * _F(5.0))) - _F(0.25), w * _F(1.3))


def _tx_wavy_lines(p, q, w, e):
    return _cover(_near(p + _F(0.22) * np.sin(q * _F(5.0))) - _F(0.08), w * _F(1.3))


def _tx_zigzag(p, q, w, e):
    return _cover(_near(p + _F(1.2) * _near(q * _F(0.8))) - _F(0.25), w * _F(1.4))


def _tx_zigzag_lines(p, q, w, e):
    return _cover(_near(p + _F(1.2) * _near(q * _F(0.8))) - _F(0.08), w * _F(1.4))


def _tx_checker(p, q, w, e):
    a, b = p - np.floor(p) - _F(0.5), q - np.floor(q) - _F(0.5)
    da = _F(0.25) - np.abs(np.abs(a) - _F(0.25))
    db = _F(0.25) - np.abs(np.abs(b) - _F(0.25))
    return np.clip(_F(0.5) + np.sign(a * b) * np.minimum(da, db) / w, _F(0.0), _F(1.0))


def _tx_grid(p, q, w, e):
    return _cover(np.minimum(_near(p), _near(q)) - _F(0.08), w)


def _tx_waffle(p, q, w, e):
    return _cover(np.minimum(_near(p), _near(q)) - _F(0.2), w)


def _lattice(p, q):
    return p - np.rint(p), q - np.rint(q)


def _tx_dots(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover(np.sqrt(a * a + b * b) - _F(0.2), w)


def _tx_big_dots(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover(np.sqrt(a * a + b * b) - _F(0.36), w)


def _tx_hex_dots(p, q, w, e):
    a, b = _hex_offset(p, q)
    return _cover(np.sqrt(a * a + b * b) - _F(0.18), w)


def _tx_big_hex_dots(p, q, w, e):
    a, b = _hex_offset(p, q)
    return _cover(np.sqrt(a * a + b * b) - _F(0.33), w)


def _tx_circles(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover(np.abs(np.sqrt(a * a + b * b) - _F(0.3)) - _F(0.06), w)


def _tx_hex_circles(p, q, w, e):
    a, b = _hex_offset(p, q)
    return _cover(np.abs(np.sqrt(a * a + b * b) - _F(0.3)) - _F(0.06), w)


def _plus(a, b, arm, half):
    return np.minimum(np.maximum(np.abs(a) - half, np.abs(b) - arm), np.maximum(np.abs(a) - arm, np.abs(b) - half))


def _tx_plus(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover(_plus(a, b, _F(0.32), _F(0.08)), w)


def _tx_crosses(p, q, w, e):
    a, b = _lattice(p, q)
    r = _F(np.sqrt(0.5))
    return _cover(_plus((a + b) * r, (a - b) * r, _F(0.32), _F(0.08)), w)


def _tx_squares(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover(np.maximum(np.abs(a), np.abs(b)) - _F(0.22), w)


def _tx_diamonds(p, q, w, e):
    a, b = _lattice(p, q)
    return _cover((np.abs(a) + np.abs(b)) * _F(np.sqrt(0.5)) - _F(0.2), w)


def _tx_small_triangles(p, q, w, e):
    a, b = _lattice(p, q)
    d = np.maximum(np.maximum(-b, _F(0.866) * a + _F(0.5) * b), _F(-0.866) * a + _F(0.5) * b)
    return _cover(d - _F(0.13), w)


def _tx_bricks(p, q, w, e):
    row = np.floor(q * _F(2.0))
    dh = _near(q * _F(2.0)) * _F(0.5)
    dv = _near(p + _F(0.5) * row)
    return _cover(np.minimum(dh, dv) - _F(0.05), w)


def _tx_tri_grid(p, q, w, e):
    p2 = p * _F(0.5) + q * _F(0.866)
    p3 = p * _F(-0.5) + q * _F(0.866)
    return _cover(np.minimum(np.minimum(_near(p), _near(p2)), _near(p3)) - _F(0.06), w)


def _tx_mesh(p, q, w, e):
    p2 = p * _F(0.5) + q * _F(0.866)
    return _cover(np.minimum(_near(p), _near(p2)) - _F(0.06), w)


def _tx_triangles(p, q, w, e):
    p2 = p * _F(0.5) + q * _F(0.866)
    p3 = p * _F(-0.5) + q * _F(0.866)
    parity = (np.floor(p) + np.floor(p2) + np.floor(p3)) % _F(2.0)
    d = np.minimum(np.minimum(_near(p), _near(p2)), _near(p3))
    return np.clip(_F(0.5) + (parity * _F(2.0) - _F(1.0)) * d / w, _F(0.0), _F(1.0))


def _tx_honeycomb(p, q, w, e):
    a, b = _hex_offset(p, q)
    h = np.maximum(np.abs(a), np.abs(_F(0.5) * a + _F(0.866) * b))
    h = np.maximum(h, np.abs(_F(0.5) * a - _F(0.866) * b))
    return _cover(np.abs(_F(0.5) - h) - _F(0.05), w)


def _tx_scales(p, q, w, e):
    # Circles of radius 0.5 on a centred square lattice cover the plane; each point shows the outline
    # of the covering circle whose centre lies highest (later rows overlap earlier ones, like scales).
    a1, b1 = _lattice(p, q)
    a2, b2 = _lattice(p - _F(0.5), q - _F(0.5))
    r1, r2 = np.sqrt(a1 * a1 + b1 * b1), np.sqrt(a2 * a2 + b2 * b2)
    in1, in2 = r1 < _F(0.5), r2 < _F(0.5)
    first = in1 & (~in2 | (b1 < b2))
    return _cover(np.abs(np.where(first, r1, r2) - _F(0.5)) - _F(0.05), w)


def _polar(p, q):
    return np.sqrt(p * p + q * q), np.arctan2(q, p)


def _tx_concentric(p, q, w, e):
    return _cover(_near(np.sqrt(p * p + q * q)) - _F(0.25), w)


def _tx_thin_rings(p, q, w, e):
    return _cover(_near(np.sqrt(p * p + q * q)) - _F(0.08), w)


def _tx_concentric_squares(p, q, w, e):
    return _cover(_near(np.maximum(np.abs(p), np.abs(q))) - _F(0.25), w)


def _tx_rays(p, q, w, e):
    r, phi = _polar(p, q)
    s = phi * _F(12.0 / (2 * np.pi))
    return _cover(_near(s) - _F(0.25), w * _F(12.0 / (2 * np.pi)) / np.maximum(r, w))


def _tx_spiral(p, q, w, e):
    r, phi = _polar(p, q)
    s = r + phi * _F(2.0 / (2 * np.pi))
    return _cover(_near(s) - _F(0.25), w * _F(1.2))


def _tx_cobweb(p, q, w, e):
    r, phi = _polar(p, q)
    dr = _near(r)
    s = phi * _F(8.0 / (2 * np.pi))
    da = _near(s) * _F(2 * np.pi / 8.0) * r
    return _cover(np.minimum(dr, da) - _F(0.05), w)


def _tx_blobs(p, q, w, e):
    f = _waves(p, q, e, 3, 0.5)
    return _cover(f * _F(-0.2) + _F(0.05), w)


def _tx_marble(p, q, w, e):
    f = _waves(p, q, e, 3, 0.5)
    return _cover(np.abs(f) * _F(0.2) - _F(0.06), w)


def _jitter(p, q, e, salt_col):
    i, j = np.floor(p), np.floor(q)
    salt = (e[:, salt_col, None, None] * 65536).astype(np.int64)
    hx, hy, hr = _cell_hash(i, j, salt), _cell_hash(i, j, salt + 7), _cell_hash(i, j, salt + 13)
    return p - i - _F(0.5), q - j - _F(0.5), hx - _F(0.5), hy - _F(0.5), hr


def _tx_sprinkles(p, q, w, e):
    a, b, hx, hy, _ = _jitter(p, q, e, 3)
    a, b = a - hx * _F(0.6), b - hy * _F(0.6)
    return _cover(np.sqrt(a * a + b * b) - _F(0.13), w)


def _tx_polka(p, q, w, e):
    a, b, hx, hy, hr = _jitter(p, q, e, 3)
    a, b = a - hx * _F(0.2), b - hy * _F(0.2)
    return _cover(np.sqrt(a * a + b * b) - (_F(0.18) + hr * _F(0.2)), w)


def _tx_bubbles(p, q, w, e):
    a, b, hx, hy, hr = _jitter(p, q, e, 3)
    rad = _F(0.14) + hr * _F(0.2)
    a, b = a - hx * (_F(0.86) - rad * 2), b - hy * (_F(0.86) - rad * 2)
    return _cover(np.abs(np.sqrt(a * a + b * b) - rad) - _F(0.045), w)


def _tx_stratified(p, q, w, e):
    i = np.floor(p * _F(2.0))
    salt = (e[:, 3, None, None] * 65536).astype(np.int64)
    width = _F(0.1) + _cell_hash(i, i * 0, salt) * _F(0.3)
    x = p * _F(2.0) - i - _F(0.5)
    return _cover((np.abs(x) - width) * _F(0.5), w)


def _tx_dashes(p, q, w, e):
    a, b = _lattice(p * _F(0.5), q)
    return _cover(np.maximum(np.abs(a) * _F(2.0) - _F(0.6), np.abs(b) - _F(0.1)), w)


def _tx_staggered_dashes(p, q, w, e):
    row = np.floor(q + _F(0.5))
    a, b = _lattice(p * _F(0.5) + row * _F(0.25), q)
    return _cover(np.maximum(np.abs(a) * _F(2.0) - _F(0.6), np.abs(b) - _F(0.1)), w)


def _tx_dotted_lines(p, q, w, e):
    a, b = _lattice(p * _F(3.0), q)
    return _cover(np.sqrt(a * a / _F(9.0) + b * b) - _F(0.09), w)


def _tx_herringbone(p, q, w, e):
    col = np.floor(p * _F(2.0))
    odd = col % _F(2.0)
    # Alternate columns slant the other way and are shifted half a period, so slants never meet.
    return _cover(_near((q + (_F(1.0) - _F(2.0) * odd) * p) * _F(2.0) + odd * _F(0.5)) * _F(0.35) - _F(0.07), w)


def _tx_woven(p, q, w, e):
    parity = (np.floor(p) + np.floor(q)) % _F(2.0)
    along = np.where(parity > 0, p, q) * _F(3.0)
    d = _near(along) / _F(3.0) - _F(0.08)
    edge = np.minimum(_near(p), _near(q)) - _F(0.04)
    return np.maximum(_cover(d, w), _cover(edge, w))


def _tx_lines_dots(p, q, w, e):
    a, b = _lattice(p - _F(0.5), q)
    dots = np.sqrt(a * a + b * b) - _F(0.14)
    return _cover(np.minimum(_near(p) - _F(0.07), dots), w)


def _tx_grid_dots(p, q, w, e):
    a, b = _lattice(p - _F(0.5), q - _F(0.5))
    dots = np.sqrt(a * a + b * b) - _F(0.14)
    return _cover(np.minimum(np.minimum(_near(p), _near(q)) - _F(0.05), dots), w)


def _tx_plaid(p, q, w, e):
    wide = _near(p) - _F(0.22)
    narrow = _near(q * _F(2.0)) * _F(0.5) - _F(0.05)
    return _cover(np.minimum(wide, narrow), w)


# name -> (function, texture period in image half-widths, centred) ; centred textures (rings,
# rays, spirals) keep their origin near the object / image centre instead of a random phase.
_TEXTURES: dict[str, tuple] = {
    "stripes": (_tx_stripes, 0.36, False),
    "lines": (_tx_lines, 0.36, False),
    "double-lines": (_tx_double_lines, 0.45, False),
    "waves": (_tx_waves, 0.36, False),
    "wavy-lines": (_tx_wavy_lines, 0.36, False),
    "zigzag": (_tx_zigzag, 0.36, False),
    "zigzag-lines": (_tx_zigzag_lines, 0.36, False),
    "checker": (_tx_checker, 0.6, False),
    "grid": (_tx_grid, 0.36, False),
    "waffle": (_tx_waffle, 0.42, False),
    "dots": (_tx_dots, 0.4, False),
    "big-dots": (_tx_big_dots, 0.36, False),
    "hex-dots": (_tx_hex_dots, 0.4, False),
    "big-hex-dots": (_tx_big_hex_dots, 0.36, False),
    "circles": (_tx_circles, 0.55, False),
    "hex-circles": (_tx_hex_circles, 0.55, False),
    "plus": (_tx_plus, 0.5, False),
    "crosses": (_tx_crosses, 0.5, False),
    "squares": (_tx_squares, 0.45, False),
    "diamonds": (_tx_diamonds, 0.45, False),
    "small-triangles": (_tx_small_triangles, 0.5, False),
    "bricks": (_tx_bricks, 0.6, False),
    "tri-grid": (_tx_tri_grid, 0.5, False),
    "mesh": (_tx_mesh, 0.4, False),
    "triangles": (_tx_triangles, 0.6, False),
    "honeycomb": (_tx_honeycomb, 0.45, False),
    "scales": (_tx_scales, 0.8, False),
    "concentric": (_tx_concentric, 0.36, True),
    "thin-rings": (_tx_thin_rings, 0.3, True),
    "concentric-squares": (_tx_concentric_squares, 0.36, True),
    "rays": (_tx_rays, 1.0, True),
    "spiral": (_tx_spiral, 0.36, True),
    "cobweb": (_tx_cobweb, 0.45, True),
    "blobs": (_tx_blobs, 0.4, False),
    "marble": (_tx_marble, 0.4, False),
    "sprinkles": (_tx_sprinkles, 0.4, False),
    "polka": (_tx_polka, 0.45, False),
    "bubbles": (_tx_bubbles, 0.5, False),
    "stratified": (_tx_stratified, 0.7, False),
    "dashes": (_tx_dashes, 0.4, False),
    "staggered-dashes": (_tx_staggered_dashes, 0.4, False),
    "dotted-lines": (_tx_dotted_lines, 0.5, False),
    "herringbone": (_tx_herringbone, 0.6, False),
    "woven": (_tx_woven, 0.7, False),
    "lines-dots": (_tx_lines_dots, 0.4, False),
    "grid-dots": (_tx_grid_dots, 0.45, False),
    "plaid": (_tx_plaid, 0.45, False),
}
TEXTURE_NAMES: tuple[str, ...] = tuple(_TEXTURES)

# Object textures: the ones still legible inside an object about 20 px wide at 32x32.
_OBJECT_TEXTURES = ("solid", "stripes", "checker", "dots", "grid", "concentric", "zigzag", "rays", "hex-dots", "blobs")
_OBJECT_TEXTURE_FN = {"solid": (_tx_solid, 1.0, False), **_TEXTURES}


# Shapes: signed distance (negative inside) in the object's frame, radius about 1.


def _sh_circle(u, v):
    return np.sqrt(u * u + v * v) - _F(0.9)


def _sh_ellipse(u, v):
    return (np.sqrt(u * u + (v * v) * _F(4.0)) - _F(1.0)) * _F(0.5)


def _sh_triangle(u, v):
    d = np.maximum(np.maximum(-v, _F(0.866) * u + _F(0.5) * v), _F(-0.866) * u + _F(0.5) * v)
    return d - _F(0.55)


def _sh_square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - _F(0.72)


def _sh_hexagon(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.maximum(av, _F(0.866) * au + _F(0.5) * av) - _F(0.8)


def _cos_n(u, r, n):
    """cos(n * phi) of the polar angle of the point (u, v) at radius r, by the Chebyshev recurrence
    on cos(phi) = u / r (no arctan)."""
    c = u / np.maximum(r, _F(1e-6))
    t0, t1 = np.ones_like(c), c
    for _ in range(n - 1):
        t0, t1 = t1, _F(2.0) * c * t1 - t0
    return t1


def _sh_star(u, v):
    r = np.sqrt(u * u + v * v)
    k = (_cos_n(u, r, 5) + _F(1.0)) * _F(0.5)
    return (r - (_F(0.42) + _F(0.58) * k * k * k)) * _F(0.6)


def _sh_flower(u, v):
    r = np.sqrt(u * u + v * v)
    return (r - (_F(0.72) + _F(0.25) * _cos_n(u, r, 6))) * _F(0.7)


def _sh_cross(u, v):
    return _plus(u, v, _F(0.92), _F(0.3))


def _sh_ring(u, v):
    return np.abs(np.sqrt(u * u + v * v) - _F(0.66)) - _F(0.3)


def _sh_crescent(u, v):
    outer = np.sqrt(u * u + v * v) - _F(0.92)
    inner = np.sqrt((u - _F(0.45)) * (u - _F(0.45)) + v * v) - _F(0.75)
    return np.maximum(outer, -inner)


_SHAPES = {
    "circle": _sh_circle,
    "ellipse": _sh_ellipse,
    "triangle": _sh_triangle,
    "square": _sh_square,
    "hexagon": _sh_hexagon,
    "star": _sh_star,
    "flower": _sh_flower,
    "cross": _sh_cross,
    "ring": _sh_ring,
    "crescent": _sh_crescent,
}
SHAPE_NAMES: tuple[str, ...] = tuple(_SHAPES)
_FILL = -1  # shape id of texture-only images
MAX_OBJECTS = 2  # copies of the outline an image may hold
OBJECT_RADIUS = (0.4, 0.75)  # range of each copy's radius, in image half-widths


def _class_table(name: str) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(class name, allowed shape ids, allowed texture names) for each class of an embedded task.

    shapes2 is a coarse two-way split of outlines (round vs pointed, like cats vs dogs: several
    sub-kinds per class); shapes5 five outlines (flowers); shapes47 the 47 textures over the whole
    frame (DTD); shapes100 every outline x object-texture pair (CIFAR-100 / Food-101), so its classes
    differ in one attribute from 18 others. Where a class allows several shapes, each image draws one
    (its copies share it); where it allows several textures, each copy draws one, so texture is a
    nuisance there and only the outline decides.
    """
    sid = {s: k for k, s in enumerate(SHAPE_NAMES)}
    if name == "shapes2":
        return [
            ("round", (sid["circle"], sid["ellipse"], sid["ring"]), _OBJECT_TEXTURES),
            ("pointed", (sid["triangle"], sid["star"], sid["cross"]), _OBJECT_TEXTURES),
        ]
    if name == "shapes5":
        return [(s, (sid[s],), _OBJECT_TEXTURES) for s in ("star", "flower", "ring", "cross", "crescent")]
    if name == "shapes47":
        return [(t, (_FILL,), (t,)) for t in TEXTURE_NAMES]
    if name == "shapes100":
        return [(f"{s}-{t}", (sid[s],), (t,)) for s in SHAPE_NAMES for t in _OBJECT_TEXTURES]
    raise KeyError(name)


EMBEDDED_TASKS: dict[str, int] = {"shapes2": 2, "shapes5": 5, "shapes47": 47, "shapes100": 100}
POOL_NAME = "shapes-pool"
_GENERATOR_VERSION = 2  # part of every seed: bump when the renderer changes what a seed draws
_TEX_IDS = {t: k for k, t in enumerate(("solid",) + TEXTURE_NAMES)}
_TEX_FNS = [_OBJECT_TEXTURE_FN[t] for t in ("solid",) + TEXTURE_NAMES]
_RENDER_CHUNK = 512  # images rendered together: large enough to amortise Python, small enough for cache


def _lightness_apart(rng: np.random.Generator, ref: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Lightness at least ``lo`` away from ``ref`` (up to ``hi``), on whichever side has room."""
    step = rng.uniform(lo, hi, ref.shape)
    sign = np.where(rng.random(ref.shape) < 0.5, -1.0, 1.0)
    out = ref + sign * step
    flipped = ref - sign * step
    bad = (out < 0.04) | (out > 0.96)
    out = np.where(bad, flipped, out)
    return np.clip(out, 0.04, 0.96)


def _colour(rng: np.random.Generator, lightness: np.ndarray, max_chroma: float) -> np.ndarray:
    """RGB (n, 3) with mean ``lightness`` and a random hue / chroma (orthogonal to grey)."""
    n = lightness.shape[0]
    hue = rng.uniform(0.0, 2 * np.pi, n)
    chroma = rng.uniform(0.0, max_chroma, n)
    e1 = np.array([2.0, -1.0, -1.0]) / np.sqrt(6.0)
    e2 = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)
    rgb = lightness[:, None] + chroma[:, None] * (np.cos(hue)[:, None] * e1 + np.sin(hue)[:, None] * e2)
    return np.clip(rgb, 0.0, 1.0)


def _frame(cx, cy, angle, sx, sy, mirror) -> np.ndarray:
    """Affine coefficients (..., 2, 3): local (u, v) = A @ (x, y, 1) for a rotated, scaled, mirrored frame."""
    c, s = np.cos(angle), np.sin(angle)
    a = np.empty((*cx.shape, 2, 3))
    a[..., 0, 0], a[..., 0, 1] = c * mirror / sx, s * mirror / sx
    a[..., 1, 0], a[..., 1, 1] = -s / sy, c / sy
    a[..., 0, 2] = -(a[..., 0, 0] * cx + a[..., 0, 1] * cy)
    a[..., 1, 2] = -(a[..., 1, 0] * cx + a[..., 1, 1] * cy)
    return a


def _spread_apart(rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, scale: np.ndarray,
                  room: np.ndarray, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, k) of each image's copies, a copy that would hide much of an earlier one (centres
    closer than 0.8x the sum of their radii) drawn again inside its room, at most ``tries`` times."""
    for k in range(1, cx.shape[1]):
        for _ in range(tries):
            gap = np.hypot(cx[:, :k] - cx[:, k:k + 1], cy[:, :k] - cy[:, k:k + 1])
            close = (gap < 0.8 * (scale[:, :k] + scale[:, k:k + 1])).any(1)
            if not close.any():
                break
            m = int(close.sum())
            cx[close, k] = rng.uniform(-1, 1, m) * room[close, k]
            cy[close, k] = rng.uniform(-1, 1, m) * room[close, k]
    return cx, cy


def _draw_scenes(rng: np.random.Generator, shape_ids: np.ndarray, tex_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every random number of every image (all float64 until rendering), given its structure:
    shape_ids (n,), tex_ids (n, MAX_OBJECTS), the texture of each object an image may hold."""
    n, k_max = tex_ids.shape
    obj = shape_ids >= 0
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape))  # noqa: E731 - local shorthand
    flip = lambda *shape: np.where(rng.random((n, *shape)) < 0.5, -1.0, 1.0)  # noqa: E731
    # 1 to MAX_OBJECTS copies of the outline, each with its own place, size, turn, mirroring and
    # texture: every part of the image shows the class, and the image's layout is a nuisance.
    count = np.where(obj, rng.integers(1, k_max + 1, n), 1)
    scale = u(OBJECT_RADIUS[0], OBJECT_RADIUS[1], k_max)
    room = 0.95 - 0.85 * scale
    cx, cy = _spread_apart(rng, u(-1, 1, k_max) * room, u(-1, 1, k_max) * room, scale, room)
    aspect = u(0.87, 1.15, k_max)
    shape_frame = _frame(cx, cy, u(0, 2 * np.pi, k_max), scale * aspect, scale / aspect, flip(k_max))
    # Texture frames: period from the texture's base period, relative to the object's size.
    base = np.array([f[1] for f in _TEX_FNS])[tex_ids]
    centred = np.array([f[2] for f in _TEX_FNS])[tex_ids]
    o = obj[:, None]
    period = base * u(0.85, 1.2, k_max) * np.where(o, scale / 0.55, 1.0)
    ox = np.where(o, cx + u(-0.1, 0.1, k_max) * scale, u(-0.5, 0.5, k_max))
    oy = np.where(o, cy + u(-0.1, 0.1, k_max) * scale, u(-0.5, 0.5, k_max))
    tex_frame = _frame(ox, oy, u(0, 2 * np.pi, k_max), period, period, flip(k_max))
    tex_frame[..., 2] += np.where(centred, 0.0, 1.0)[..., None] * rng.uniform(0, 64, (n, k_max, 2))
    # Colours, one palette per image: lightness keeps texture tones and objects / background apart.
    l_bg = u(0.12, 0.88)
    l_1 = _lightness_apart(rng, l_bg, 0.22, 0.5)
    l_2 = _lightness_apart(rng, l_1, 0.28, 0.6)
    for _ in range(8):  # redraw the second tone where it would melt into the background
        near_bg = np.abs(l_2 - l_bg) < 0.15
        if not near_bg.any():
            break
        l_2[near_bg] = _lightness_apart(rng, l_1[near_bg], 0.28, 0.6)
    # Clutter: two low-frequency colour waves, two stray lines (each present half the time), light.
    waves = rng.normal(0.0, 2.2, (n, 2, 2))
    lines = np.empty((n, 2, 3))
    normal = u(0, 2 * np.pi)[:, None] + rng.uniform(0.6, 2.5, (n, 2)) * np.array([0.0, 1.0])
    lines[:, :, 0], lines[:, :, 1] = np.cos(normal), np.sin(normal)
    lines[:, :, 2] = rng.uniform(-0.85, 0.85, (n, 2))
    return {
        "shape": shape_ids.astype(np.int64),
        "count": count.astype(np.int64),
        "tex": tex_ids.astype(np.int64),
        "shape_frame": shape_frame,
        "shape_px": 1.0 / (scale * np.minimum(aspect, 1 / aspect)),
        "tex_frame": tex_frame,
        "tex_px": 1.0 / period,
        "extra": rng.random((n, k_max, 8)),
        "c_bg": _colour(rng, l_bg, 0.3),
        "c_bg2": _colour(rng, np.clip(l_bg + rng.normal(0, 0.08, n), 0, 1), 0.3),
        "c_1": _colour(rng, l_1, 0.35),
        "c_2": _colour(rng, l_2, 0.35),
        "waves": waves,
        "wave_phase": rng.uniform(0, 2 * np.pi, (n, 2)),
        "clutter": u(0.3, 1.0),
        "lines": lines,
        "line_width": rng.uniform(0.03, 0.07, (n, 2)),
        "line_on": (rng.random((n, 2)) < 0.5).astype(np.float64),
        "c_line": np.stack([_colour(rng, _lightness_apart(rng, l_bg, 0.1, 0.3), 0.3) for _ in range(2)], 1),
        "light": rng.normal(0.0, 0.1, (n, 2)),
        "noise": u(0.0, 0.045),
        "noise_seed": rng.integers(0, 2**63 - 1, n),
    }


def _paint_objects(g: dict[str, np.ndarray], img: list[np.ndarray], affine, per_image, pix: np.float32) -> None:
    """Paint each image's copies of its outline over the RGB planes ``img``, later copies over
    earlier ones; a texture-only image is one copy filling the frame. One group per texture and
    per shape, so each texture or outline function runs once per copy slot."""
    size = img[0].shape[-1]
    for k in range(g["tex"].shape[1]):
        on = np.flatnonzero(g["count"] > k)
        if on.size == 0:
            break
        t = np.empty((on.size, size, size), _F)
        tex = g["tex"][on, k]
        for tid in np.unique(tex):
            idx = on[tex == tid]
            p, q = affine(g["tex_frame"][idx, k, 0]), affine(g["tex_frame"][idx, k, 1])
            t[tex == tid] = _TEX_FNS[tid][0](p, q, pix * per_image(g["tex_px"][idx, k]), g["extra"][idx, k].astype(_F))
        mask = np.ones((on.size, size, size), _F)
        shp = g["shape"][on]
        for sid in np.unique(shp):
            if sid < 0:
                continue
            idx = on[shp == sid]
            u, v = affine(g["shape_frame"][idx, k, 0]), affine(g["shape_frame"][idx, k, 1])
            mask[shp == sid] = _cover(_SHAPES[SHAPE_NAMES[sid]](u, v), pix * per_image(g["shape_px"][idx, k]))
        for c in range(3):
            obj = per_image(g["c_1"][on, c]) + t * per_image(g["c_2"][on, c] - g["c_1"][on, c])
            plane = img[c][on]
            plane += mask * (obj - plane)
            img[c][on] = plane


def _render(prm: dict[str, np.ndarray], lo: int, hi: int, size: int) -> np.ndarray:
    """Render images lo..hi of ``prm`` at size x size: (hi - lo, size, size, 3) uint8.

    Colour work runs per channel on (n, H, W) planes: numpy broadcasts over a trailing axis of 3
    about 30x slower than over contiguous rows.
    """
    n = hi - lo
    g = {k: v[lo:hi] for k, v in prm.items()}
    pix = _F(2.0 / size)
    coords = (np.arange(size, dtype=_F) + _F(0.5)) * pix - _F(1.0)
    x, y = coords[None, None, :], coords[None, :, None]

    def affine(a: np.ndarray) -> np.ndarray:  # a: (k, 3) float64 -> (k, H, W)
        a = a.astype(_F)[:, :, None, None]
        return (x * a[:, 0] + a[:, 2]) + y * a[:, 1]

    def per_image(v: np.ndarray) -> np.ndarray:  # (k,) -> (k, 1, 1) float32
        return v.astype(_F)[:, None, None]

    # Background: base colour blended towards a second colour by a low-frequency wave field.
    field = np.cos(affine(np.concatenate([g["waves"][:, 0], g["wave_phase"][:, :1]], 1)))
    field += np.cos(affine(np.concatenate([g["waves"][:, 1], g["wave_phase"][:, 1:]], 1)))
    field *= per_image(0.25 * g["clutter"])
    field += _F(0.5)
    img = [per_image(g["c_bg"][:, c]) + field * per_image(g["c_bg2"][:, c] - g["c_bg"][:, c]) for c in range(3)]
    for k in range(2):
        idx = np.flatnonzero(g["line_on"][:, k] > 0)
        if idx.size == 0:
            continue
        cov = _cover(np.abs(affine(g["lines"][idx, k])) - per_image(g["line_width"][idx, k]), pix)
        for c in range(3):
            plane = img[c][idx]
            plane += cov * (per_image(g["c_line"][idx, k, c]) - plane)
            img[c][idx] = plane
    _paint_objects(g, img, affine, per_image, pix)
    light = affine(np.concatenate([g["light"], np.ones((n, 1))], 1))
    light *= _F(255.0)
    # Uniform noise from raw bytes (a fraction of the cost of Gaussian draws), std = noise level.
    noise = np.random.default_rng(int(g["noise_seed"][0])).bytes(3 * n * size * size)
    noise = np.frombuffer(noise, np.uint8).reshape(3, n, size, size)
    noise_scale = per_image(g["noise"] * 255.0 * np.sqrt(12.0) / 256.0)
    out = np.empty((3, n, size, size), _F)
    for c in range(3):
        plane = img[c]
        plane *= light
        plane += (noise[c] - _F(127.5)) * noise_scale
        plane += _F(0.5)
        np.clip(plane, _F(0.0), _F(255.0), out=out[c])
    return np.moveaxis(out, 0, -1).astype(np.uint8)


def _split_seed(name: str, split: str, seed: int) -> list[int]:
    """Seed sequence entropy for one split: a separate namespace per (task, split), see generate()."""
    return [int(seed), zlib.crc32(name.encode()), zlib.crc32(split.encode()), _GENERATOR_VERSION]


def generate(name: str, n: int, split: str = "train", image_size: int = 32,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """``n`` images of an embedded task (balanced classes) or of the unlabeled pool, as (images
    (n, size, size, 3) uint8, labels (n,) int64 or None for the pool, class names).

    Deterministic for (name, split, n, image_size, seed). Disjointness: every (task, split) pair
    draws from its own seed namespace (task and split names are part of the seed sequence entropy,
    the pool's name is neither a task nor a split), so no two splits share a random stream; and an
    image is rendered from ~100 continuous random numbers, so two streams could only yield the same
    image by drawing all of them equal. The test suite checks it on thousands of images.
    """
    if name != POOL_NAME and name not in EMBEDDED_TASKS:
        raise UserError(f"unknown embedded dataset {name!r}; known: {', '.join([*EMBEDDED_TASKS, POOL_NAME])}")
    if n < 0 or image_size < 8:
        raise UserError(f"cannot generate {n} images of size {image_size} (need n >= 0, size >= 8)")
    rng = np.random.default_rng(_split_seed(name, split, seed))
    if name == POOL_NAME:
        structures = [(s, _TEX_IDS[t]) for s in range(len(SHAPE_NAMES)) for t in _OBJECT_TEXTURES]
        structures += [(_FILL, _TEX_IDS[t]) for t in TEXTURE_NAMES]
        pick = rng.integers(0, len(structures), n)
        table = np.array(structures, dtype=np.int64).reshape(-1, 2)
        shape_ids = table[pick, 0]
        # The picked texture fills the first copy (or the frame); further copies draw their own.
        tex_ids = np.repeat(table[pick, 1:], MAX_OBJECTS, 1)
        object_tex = np.array([_TEX_IDS[t] for t in _OBJECT_TEXTURES])
        others = object_tex[rng.integers(0, len(object_tex), (n, MAX_OBJECTS - 1))]
        tex_ids[:, 1:] = np.where(shape_ids[:, None] >= 0, others, tex_ids[:, 1:])
        labels, classes = None, []
    else:
        table = _class_table(name)
        classes = [c[0] for c in table]
        labels = rng.permutation(np.arange(n) % len(table)).astype(np.int64)
        shape_ids = np.empty(n, np.int64)
        tex_ids = np.empty((n, MAX_OBJECTS), np.int64)
        for k, (_, shapes, textures) in enumerate(table):
            idx = np.flatnonzero(labels == k)
            shape_ids[idx] = np.array(shapes)[rng.integers(0, len(shapes), idx.size)]
            choices = np.array([_TEX_IDS[t] for t in textures])
            tex_ids[idx] = choices[rng.integers(0, len(textures), (idx.size, MAX_OBJECTS))]
    prm = _draw_scenes(rng, shape_ids, tex_ids)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for lo in range(0, n, _RENDER_CHUNK):
        hi = min(n, lo + _RENDER_CHUNK)
        images[lo:hi] = _render(prm, lo, hi, image_size)
    return images, labels, classes
