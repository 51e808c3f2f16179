"""Procedural "shapes" images with exact object masks, for the embedded demo model.

Every image holds exactly one object of the labelled class (one of
``SHAPE_CLASSES``) at a random position, scale (20%-55% of the image side),
rotation, aspect ratio (0.9-1.1) and colour, drawn over a cluttered
background: a smooth two-colour gradient, low-frequency colour noise, stripes,
soft blobs and small distractors (thin lines, dots, short arcs) that are far
smaller or thinner than any object, so the label is well defined. The mask is
exactly the object's pixels (the object is drawn last and opaque enough to see).

Rendering is pure JAX: each shape is an inside test on the grid of pixel
centres in the object's own coordinates, ``jit`` + ``vmap`` over items. Item
``i`` of seed ``s`` is rendered from ``fold_in(key(s), i)`` alone, so it never
depends on how many items are asked for: a held-out set is another seed, and
``shapes_batches`` yields the same items as ``shapes_dataset`` in order. All of
an item's parameters come from one uniform draw (``_Draw``: one Threefry call
instead of dozens keeps compilation near 1.5 s on CPU) and its per-pixel noise
from an integer hash; rendering takes about 7 ms per 224 x 224 image on two CPU
cores. Items are bit-identical across runs on one backend; CPU and GPU may
differ in the last float bits (and so, rarely, in a boundary pixel).

Glossary (object coordinates): ``u, v`` = pixel offsets from the object centre,
rotated by minus the object angle and divided by the object radius ``s``; every
shape fits roughly in the unit disc ``u^2 + v^2 <= 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from xai.eval.data import normalize

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "heart",
    "arrow",
)
NUM_CLASSES = len(SHAPE_CLASSES)

# Object diameter as a fraction of the image side.
SCALE_RANGE = (0.20, 0.55)
# Distractor counts (all drawn below the object, never part of its mask).
NUM_LINES = 5
NUM_DOTS = 6
NUM_ARCS = 3
NUM_BLOBS = 4
# Minimal RGB distance between the object colour and the mean background under it.
MIN_CONTRAST = 0.35
DEFAULT_CHUNK = 64


# ---------------------------------------------------------------------------
# Inside tests in object coordinates (u right, v down; unit-disc sized shapes).


def _half_planes(u, v, n: int, inradius: float, phase: float):
    """Regular convex polygon: inside all n half-planes at angles phase + 2*pi*k/n."""
    inside = jnp.ones(u.shape, bool)
    for k in range(n):
        phi = phase + 2.0 * math.pi * k / n
        inside &= u * math.cos(phi) + v * math.sin(phi) <= inradius
    return inside


def _circle(u, v):
    return u * u + v * v <= 0.92**2


def _square(u, v):
    return jnp.maximum(jnp.abs(u), jnp.abs(v)) <= 0.70


def _triangle(u, v):
    # Equilateral, circumradius 1 (inradius 1/2), centroid at the origin.
    return _half_planes(u, v, 3, 0.5, math.pi / 2)


def _hexagon(u, v):
    return _half_planes(u, v, 6, 0.95 * math.cos(math.pi / 6), 0.0)


def _star(u, v, points: int = 5, outer: float = 1.0, inner: float = 0.42):
    # Fold the angle into half a sector [0, pi/points]; there the star is the
    # triangle (origin, tip (outer, 0), inner vertex at angle pi/points).
    sector = 2.0 * math.pi / points
    r = jnp.sqrt(u * u + v * v)
    a = jnp.arctan2(v, u)
    a = jnp.abs(jnp.mod(a + sector / 2, sector) - sector / 2)
    qx, qy = r * jnp.cos(a), r * jnp.sin(a)
    ix, iy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # Same side of the edge tip -> inner vertex as the origin.
    cross = (ix - outer) * qy - iy * (qx - outer)
    return cross >= 0.0


def _cross(u, v, half_width: float = 0.28, half_length: float = 0.95):
    au, av = jnp.abs(u), jnp.abs(v)
    return ((au <= half_width) & (av <= half_length)) | ((av <= half_width) & (au <= half_length))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _crescent(u, v):
    return (u * u + v * v <= 0.95**2) & ((u - 0.42) ** 2 + v * v > 0.78**2)


def _heart(u, v):
    # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 with y up, scaled to about the unit disc.
    x = 1.3 * u
    y = -1.3 * v + 0.12
    q = x * x + y * y - 1.0
    return q * q * q - x * x * y * y * y <= 0.0


def _arrow(u, v):
    shaft = (u >= -0.95) & (u <= 0.15) & (jnp.abs(v) <= 0.20)
    head = (u >= 0.15) & (u <= 0.95) & (jnp.abs(v) <= 0.6 * (0.95 - u) / 0.8)
    return shaft | head


_INSIDE = (
    _circle,
    _square,
    _triangle,
    _star,
    _cross,
    _ring,
    _hexagon,
    _crescent,
    _heart,
    _arrow,
)
assert len(_INSIDE) == NUM_CLASSES


# ---------------------------------------------------------------------------
# Background and distractors.


def _segment_distance(py, px, y0, x0, y1, x1):
    """Distance from pixel centres [H, W] to segments [J] -> [J, H, W]."""
    py, px = py[None], px[None]
    y0, x0, y1, x1 = (a[:, None, None] for a in (y0, x0, y1, x1))
    dy, dx = y1 - y0, x1 - x0
    t = ((py - y0) * dy + (px - x0) * dx) / jnp.maximum(dy * dy + dx * dx, 1e-6)
    t = jnp.clip(t, 0.0, 1.0)
    return jnp.sqrt((py - y0 - t * dy) ** 2 + (px - x0 - t * dx) ** 2)


def _hash_uniform(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Cheap deterministic uniform [0, 1) noise: an integer hash of (seed, index).

    Much faster than ``jax.random`` for per-pixel noise on CPU; statistical
    quality is irrelevant for sensor-like noise.
    """
    x = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + seed
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    return ((x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))).reshape(shape)


class _Draw:
    """Hands out slices of ONE uniform draw per item.

    Each ``jax.random`` call inlines a whole Threefry computation; drawing all
    of an item's ~250 parameters at once keeps compilation short. Appending a
    new parameter at the end leaves the earlier ones unchanged.
    """

    SIZE = 320

    def __init__(self, key: jax.Array):
        self._u = jax.random.uniform(key, (self.SIZE,))
        self._next = 0

    def __call__(self, shape: tuple[int, ...] = (), lo: float = 0.0, hi: float = 1.0):
        k = math.prod(shape)
        if self._next + k > self.SIZE:
            raise RuntimeError("_Draw.SIZE too small")  # trace-time check
        x = self._u[self._next : self._next + k].reshape(shape)
        self._next += k
        return lo + (hi - lo) * x


_COARSE = 6  # cells per side of the low-frequency colour noise


@functools.cache
def _stretch_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights (half-pixel centres, clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - i0
    w = np.zeros((n_out, n_in), np.float32)
    w[np.arange(n_out), i0] = 1.0 - frac
    w[np.arange(n_out), i0 + 1] = frac
    return w


def _background(draw: _Draw, py, px, size: int):
    """Gradient + low-frequency colour noise + stripes + soft blobs, [H, W, 3]."""
    c0, c1 = draw((2, 3))
    phi = draw((), 0.0, 2 * math.pi)
    t = (px * jnp.cos(phi) + py * jnp.sin(phi)) / size
    t = (t - t.min()) / (t.max() - t.min())
    img = c0 * (1.0 - t[..., None]) + c1 * t[..., None]

    # Low-frequency colour noise (smooth colour patches): 6 x 6 cells stretched.
    amp = draw((), 0.08, 0.35)
    coarse = draw((_COARSE, _COARSE, 3), -amp, amp)
    stretch = jnp.asarray(_stretch_matrix(_COARSE, size))
    img += jnp.einsum("Hh,hwc,Ww->HWc", stretch, coarse, stretch)

    # Stripes of random period, angle, phase, colour direction and amplitude.
    amp = draw((), 0.02, 0.14)
    freq = draw((), 4.0, 24.0)
    psi, phase = draw((2,), 0.0, 2 * math.pi)
    direction = draw((3,), -1.0, 1.0)
    wave = jnp.sin(2 * math.pi * freq * (px * jnp.cos(psi) + py * jnp.sin(psi)) / size + phase)
    img += amp * wave[..., None] * direction

    # Soft Gaussian blobs, blended as a normalized weighted mean with the rest.
    # A Gaussian is separable: exp(-(dy^2 + dx^2) / 2s^2) = gy(y) * gx(x).
    centers = draw((NUM_BLOBS, 2, 1), 0.0, size)
    sigmas = draw((NUM_BLOBS, 1), 0.04 * size, 0.15 * size)
    colors = draw((NUM_BLOBS, 3))
    strength = draw((NUM_BLOBS, 1), 0.5, 2.5)
    line = jnp.arange(size, dtype=jnp.float32) + 0.5
    gy = strength * jnp.exp(-((line - centers[:, 0]) ** 2) / (2.0 * sigmas**2))
    gx = jnp.exp(-((line - centers[:, 1]) ** 2) / (2.0 * sigmas**2))
    num = jnp.einsum("jh,jw,jc->hwc", gy, gx, colors)
    den = jnp.einsum("jh,jw->hw", gy, gx)
    return (img + num) / (1.0 + den[..., None])


def _distractors(draw: _Draw, img, py, px, size: int):
    """Thin lines, small dots and short thin arcs: none resembles a shape class.

    All distractors are opaque; a later one covers an earlier one, which is
    computed at once as "the last distractor covering the pixel".
    """
    unit = size / 224
    # Thin lines (1-3 px wide at 224) between random points.
    ends = draw((4, NUM_LINES), -0.1 * size, 1.1 * size)
    widths = draw((NUM_LINES, 1, 1), 1.0 * unit, 3.0 * unit)
    lines = _segment_distance(py, px, *ends) <= widths / 2
    # Dots of radius 0.7%-2% of the side (objects have radius >= 10%).
    centers = draw((NUM_DOTS, 2, 1, 1), 0.0, size)
    radii = draw((NUM_DOTS, 1, 1), 0.007 * size, 0.02 * size)
    dots = (py - centers[:, 0]) ** 2 + (px - centers[:, 1]) ** 2 <= radii**2
    # Arcs: 60-200 degree pieces of thin (2 px at 224) circles of radius 3%-7%;
    # inside the arc <=> angle to the arc's middle direction <= half its span.
    centers = draw((NUM_ARCS, 2, 1, 1), 0.0, size)
    radii = draw((NUM_ARCS, 1, 1), 0.03 * size, 0.07 * size)
    mid = draw((NUM_ARCS, 1, 1), 0.0, 2 * math.pi)
    half_span = draw((NUM_ARCS, 1, 1), math.pi / 6, 5 * math.pi / 9)
    dy, dx = py - centers[:, 0], px - centers[:, 1]
    r = jnp.sqrt(dy * dy + dx * dx)
    along = dx * jnp.cos(mid) + dy * jnp.sin(mid)
    arcs = (jnp.abs(r - radii) <= unit) & (along >= r * jnp.cos(half_span))

    inside = jnp.concatenate([lines, dots, arcs])  # [J, H, W], drawing order
    j = jnp.arange(inside.shape[0])[:, None, None]
    top = jnp.max(jnp.where(inside, j, -1), axis=0)
    colors = draw((inside.shape[0], 3))
    return jnp.where((top >= 0)[..., None], colors[jnp.maximum(top, 0)], img)


# ---------------------------------------------------------------------------
# One item.


def _render_one(key: jax.Array, size: int) -> dict[str, jax.Array]:
    """Renders one item from its own key.

    Returns a dict with ``image`` (float32 [H, W, 3] in [0, 1]), ``label``
    (int32 []), ``mask`` (bool [H, W]) and ``background`` (float32 [H, W, 3]:
    the picture before the object was drawn, for tests).
    """
    draw = _Draw(key)
    label = jnp.minimum(jnp.floor(draw() * NUM_CLASSES), NUM_CLASSES - 1).astype(jnp.int32)

    # Geometry: radius s, centre (cy, cx) mostly inside, angle, aspect.
    s = draw((), *SCALE_RANGE) * size / 2
    cy, cx = draw((2,), 0.85 * s, size - 0.85 * s)
    theta = draw((), 0.0, 2 * math.pi)
    aspect = draw((), 0.9, 1.1)

    coords = jnp.arange(size, dtype=jnp.float32) + 0.5
    py, px = jnp.meshgrid(coords, coords, indexing="ij")
    background = _background(draw, py, px, size)
    background = _distractors(draw, background, py, px, size)

    dy, dx = py - cy, px - cx
    u = (jnp.cos(theta) * dx + jnp.sin(theta) * dy) / (s * aspect)
    v = (-jnp.sin(theta) * dx + jnp.cos(theta) * dy) * aspect / s
    mask = jnp.stack([f(u, v) for f in _INSIDE])[label]

    # Colour: the first of a few random candidates far enough (RGB distance)
    # from the mean background under the object, else the farthest candidate.
    area = jnp.maximum(mask.sum(), 1)
    bg_mean = (background * mask[..., None]).sum((0, 1)) / area
    candidates = draw((8, 3))
    dist = jnp.linalg.norm(candidates - bg_mean, axis=-1)
    far = dist >= MIN_CONTRAST
    color = candidates[jnp.where(far.any(), jnp.argmax(far), jnp.argmax(dist))]

    # Shading across the object and slight transparency (stripes show through).
    gain = draw((), 0.0, 0.3)
    psi = draw((), 0.0, 2 * math.pi)
    alpha = draw((), 0.8, 1.0)
    shade = 1.0 + gain * jnp.clip(u * jnp.cos(psi) + v * jnp.sin(psi), -1.0, 1.0)
    obj = jnp.clip(color * shade[..., None], 0.0, 1.0)
    image = jnp.where(mask[..., None], alpha * obj + (1.0 - alpha) * background, background)

    # Sensor noise over everything (uniform with standard deviation sigma).
    sigma = draw((), 0.01, 0.05)
    bits = jax.random.key_data(key).ravel()
    uniform = _hash_uniform(bits[0] ^ bits[-1], image.shape)
    image = image + sigma * math.sqrt(12.0) * (uniform - 0.5)
    image = jnp.clip(image, 0.0, 1.0).astype(jnp.float32)
    return {
        "image": image,
        "label": label,
        "mask": mask,
        "background": jnp.clip(background, 0.0, 1.0).astype(jnp.float32),
    }


def item_keys(seed: int | jax.Array, indices: jax.Array) -> jax.Array:
    """Per-item keys ``fold_in(key(seed), i)``: item i never depends on n."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


@functools.partial(jax.jit, static_argnames=("img_size", "normalized", "with_background"))
def render_items(
    seed: int | jax.Array,
    indices: jax.Array,
    *,
    img_size: int = 224,
    normalized: bool = True,
    with_background: bool = False,
):
    """Renders items ``indices`` [n] of ``seed`` on the default device.

    Returns (images float32 [n, H, W, 3], labels int32 [n], masks bool [n, H, W]),
    images ImageNet-normalized when ``normalized`` else in [0, 1]; with
    ``with_background`` also the [0, 1] backgrounds before the object was drawn.
    """
    keys = item_keys(seed, jnp.asarray(indices, jnp.uint32))
    out = jax.vmap(lambda k: _render_one(k, img_size))(keys)
    images = normalize(out["image"]) if normalized else out["image"]
    result = (images, out["label"], out["mask"])
    return result + (out["background"],) if with_background else result


def shapes_dataset(
    n: int,
    seed: int = 0,
    *,
    img_size: int = 224,
    normalized: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items 0..n-1 of ``seed`` as host arrays.

    Returns (images float32 [n, H, W, 3], labels int32 [n], masks bool [n, H, W]);
    images are ImageNet-normalized, or in [0, 1] with ``normalized=False``.
    Rendered ``chunk`` items at a time (the last chunk is padded with the
    following items and cut, so one compilation serves every chunk).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chunk = max(1, min(chunk, n))
    images = np.empty((n, img_size, img_size, 3), np.float32)
    labels = np.empty((n,), np.int32)
    masks = np.empty((n, img_size, img_size), bool)
    for start in range(0, n, chunk):
        idx = jnp.arange(start, start + chunk)
        im, lb, mk = render_items(seed, idx, img_size=img_size, normalized=normalized)
        stop = min(start + chunk, n)
        images[start:stop] = np.asarray(im)[: stop - start]
        labels[start:stop] = np.asarray(lb)[: stop - start]
        masks[start:stop] = np.asarray(mk)[: stop - start]
    return images, labels, masks


def shapes_dataset01(
    n: int, seed: int = 0, *, img_size: int = 224, chunk: int = DEFAULT_CHUNK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``shapes_dataset`` with images in [0, 1] (before normalization)."""
    return shapes_dataset(n, seed, img_size=img_size, normalized=False, chunk=chunk)


def shapes_batches(
    batch_size: int,
    seed: int = 0,
    *,
    start: int = 0,
    stop: int | None = None,
    img_size: int = 224,
    normalized: bool = True,
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Batches of consecutive items start, start+1, ... (forever if ``stop`` is None).

    Yields device arrays (images [B, H, W, 3], labels int32 [B], masks bool
    [B, H, W]); concatenated they equal ``shapes_dataset`` of the same seed.
    With ``stop`` the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    i = start
    while stop is None or i < stop:
        im, lb, mk = render_items(seed, jnp.arange(i, i + batch_size), img_size=img_size, normalized=normalized)
        if stop is not None and i + batch_size > stop:
            k = stop - i
            im, lb, mk = im[:k], lb[:k], mk[:k]
        yield im, lb, mk
        i += batch_size
