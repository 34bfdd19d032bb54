"""CT-like phantoms with many classes, from tiny test volumes to 512 x 512 x 800 benchmark cases.

Each case is a body along Z (elliptic cross-section whose semi-axes vary slowly with Z) made of a
subcutaneous fat layer, a muscle layer and an inner soft-tissue cavity, all in air. Inside it lie N labelled
structures (labels 1..N, named in dataset.json) of varied size:

- ``large_organ`` / ``medium_organ`` / ``small_organ``: deformed ellipsoids (semi-axes about 50-90, 20-55 and
  5-12 mm; the surface carries a few smooth sine "bumps"), rotated in-plane, kept inside the cavity;
- ``large_vessel`` (radius 9-13 mm, aorta / vena cava sized) and ``vessel`` (2-6 mm diameter): tubes running
  along Z whose centre line wiggles in-plane;
- ``spine``: a column of vertebral bodies (cortical shell around cancellous bone, intervertebral discs);
- ``ribs``: arcs of bone in the muscle layer, repeating along the upper part of the body.

Hounsfield units (sampled per case and structure): air -1000, fat -120..-80, muscle 45..60, cavity soft
tissue 30..45, organs 40..160 (contrast enhanced), vessels 150..300 (contrast), cancellous bone 300..450,
ribs 500..900, cortical bone 900..1200; white noise of ``noise_hu`` (default 12 HU) is added everywhere and
the image is stored as int16. There is no partial-volume blur: label and image edges coincide exactly.

Sizes and ``scale``: ``slices`` / ``in_plane`` / the spacing ranges describe the case at ``scale=1``
(defaults: 300-800 slices of 1-5 mm, 512 x 512 pixels of 0.7-0.9 mm). ``scale`` multiplies the voxel counts
and divides the spacing, so the anatomy keeps its physical size in mm and only the resolution changes: tests
use ``scale`` around 0.1 (about 32 x 48 x 48 voxels of 8-9 mm in-plane). At such a resolution a 2 mm vessel
or a 6 mm lymph node can fall between voxel centres and vanish; with ``keep_thin_structures`` (default) every
semi-axis, vessel radius and rib thickness is widened to at least one voxel of its axis, which keeps every
class present at any scale. At ``scale=1`` the widening never applies (the thinnest structure, a 1 mm vessel
radius, is wider than the coarsest in-plane spacing, 0.9 mm; the thinnest along Z, 6 mm, exceeds 5 mm slices).
With ``keep_thin_structures=False`` thin structures keep their physical size and may vanish at coarse scale;
:func:`generate_ct_phantoms` logs any class absent from a case.

Memory and speed: a case is rendered in slabs of :data:`SLAB` slices into a preallocated int16 image and uint8
label (512 x 512 x 800: 400 MB + 200 MB), each structure evaluated only inside its bounding box; working
arrays are float32 of one slab. Measured on a shared 2-core machine (32 classes): 512 x 512 x 400 renders in
4-5 s, 512 x 512 x 800 in about 6 s at 0.8 GB peak RSS; writing a 400-slice case as .nii.gz adds about 6 s. Case ``i`` depends only on ``(seed, i)``; the noise of a slab only on
``(seed, i, first slice)``, so results do not depend on anything else.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.dataset.cases import IMAGES_TRAIN, LABELS_TRAIN
from autoseg.dataset.spec import DATASET_JSON
from autoseg.fileio import write_json
from autoseg.io import Geometry, write_image, write_segmentation

logger = logging.getLogger(__name__)

SLAB = 32  # slices rendered at once: 32 x 512 x 512 float32 = 32 MB per working array
AIR_HU = -1000.0
HU_RANGES = {  # what each tissue may take before noise, (low, high) in HU; tests hold the generator to these
    "air": (AIR_HU, AIR_HU),
    "fat": (-120.0, -80.0),
    "muscle": (45.0, 60.0),
    "soft_tissue": (30.0, 45.0),
    "organ": (40.0, 160.0),
    "vessel": (150.0, 300.0),
    "bone": (300.0, 1200.0),
}
KIND_TISSUE = {"large_organ": "organ", "medium_organ": "organ", "small_organ": "organ", "large_vessel": "vessel",
               "vessel": "vessel", "spine": "bone", "ribs": "bone"}

# The first 12 classes give every kind at least once; further classes cycle through CYCLE. Large organs and
# large vessels are capped (the cavity has room for few of them) and become medium organs / vessels beyond.
FIRST_KINDS = ("large_organ", "large_organ", "medium_organ", "medium_organ", "spine", "large_vessel", "vessel",
               "small_organ", "medium_organ", "vessel", "small_organ", "ribs")
CYCLE = ("vessel", "medium_organ", "small_organ", "vessel", "small_organ", "medium_organ", "large_vessel",
         "large_organ")
MAX_OF_KIND = {"large_organ": 4, "large_vessel": 2, "spine": 1, "ribs": 1}
FALLBACK_KIND = {"large_organ": "medium_organ", "large_vessel": "vessel", "spine": "small_organ",
                 "ribs": "small_organ"}
# painting order: later kinds overwrite earlier ones, so the small ones always keep their voxels
PAINT_ORDER = ("large_organ", "medium_organ", "spine", "ribs", "large_vessel", "vessel", "small_organ")
ORGAN_SEMI_AXES_MM = {  # (z, in-plane a, in-plane b) ranges
    "large_organ": ((60.0, 90.0), (50.0, 70.0), (45.0, 65.0)),
    "medium_organ": ((30.0, 55.0), (20.0, 35.0), (20.0, 40.0)),
    "small_organ": ((6.0, 12.0), (5.0, 10.0), (5.0, 10.0)),
}
ORGAN_BUMP = {"large_organ": 0.08, "medium_organ": 0.06, "small_organ": 0.03}  # amplitude of each of 3 sines


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. Ranges are sampled per case; sizes and spacings are given at ``scale=1``."""

    num_cases: int = 4
    num_classes: int = 32  # foreground classes, labels 1..num_classes (at most 255)
    slices: tuple[int, int] = (300, 800)
    in_plane: int = 512
    slice_spacing_mm: tuple[float, float] = (1.0, 5.0)
    in_plane_spacing_mm: tuple[float, float] = (0.7, 0.9)
    scale: float = 1.0
    noise_hu: float = 12.0
    keep_thin_structures: bool = True
    file_ending: str = ".nii.gz"
    seed: int = 0


@dataclass(frozen=True)
class Structure:
    """One labelled structure, in physical mm (array axis order Z, Y, X; voxel centres at ``(i + 0.5) * sp``).

    Blobs (organs): ``centre``, ``semi_axes`` (z, a, b), in-plane ``angle`` (rad), ``bumps`` rows of
    (amplitude, wave vector z, y, x, phase). Tubes (vessels): ``centre`` is the centre line's mean position,
    ``radius``, ``wiggle`` (amplitude y, amplitude x, wavelength, phase y, phase x) and the ``z_range`` covered.
    """

    label: int
    name: str
    kind: str
    hu: float
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float] = (0.0, 0.0, 0.0)
    angle: float = 0.0
    bumps: tuple[tuple[float, ...], ...] = ()
    radius: float = 0.0
    wiggle: tuple[float, ...] = (0.0, 0.0, 1.0, 0.0, 0.0)
    z_range: tuple[float, float] = (0.0, 0.0)
    inner_hu: float = 0.0  # spine: cancellous bone inside the cortical shell


@dataclass(frozen=True)
class Body:
    """The body's cross-section: centre (y, x) mm, semi-axes (y, x) mm at mid-height, their slow variation
    along Z (relative amplitude, wavelength mm, phase), and the fat / muscle layer thicknesses in mm."""

    centre: tuple[float, float]
    semi_axes: tuple[float, float]
    variation: tuple[float, float, float]
    fat_mm: float
    muscle_mm: float
    fat_hu: float
    muscle_hu: float
    soft_tissue_hu: float
    spine_period_mm: float
    disc_mm: float
    rib_period_mm: float
    rib_mm: float
    rib_z_end: float  # ribs exist for z < this (mm)


@dataclass(frozen=True)
class Layout:
    """Everything random about one case, decided before any voxel is drawn."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    body: Body
    structures: tuple[Structure, ...]
    noise_hu: float
    seed: tuple[int, int]
    labels: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ classes
def structure_kinds(num_classes: int) -> list[str]:
    """The kind of each class 1..N, in label order (see FIRST_KINDS / CYCLE)."""
    if not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in 1..255 (uint8 labels), got {num_classes}")
    kinds: list[str] = []
    for index in range(num_classes):
        kind = FIRST_KINDS[index] if index < len(FIRST_KINDS) else CYCLE[(index - len(FIRST_KINDS)) % len(CYCLE)]
        while kinds.count(kind) >= MAX_OF_KIND.get(kind, num_classes):
            kind = FALLBACK_KIND[kind]
        kinds.append(kind)
    return kinds


def class_names(kinds: Sequence[str]) -> list[str]:
    """``spine`` and ``ribs`` keep their name; other kinds are numbered: ``vessel_1``, ``vessel_2``, ..."""
    counts: dict[str, int] = {}
    names = []
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
        names.append(kind if MAX_OF_KIND.get(kind) == 1 else f"{kind}_{counts[kind]}")
    return names


def dataset_labels(num_classes: int) -> dict[str, int]:
    """dataset.json ``labels``: background 0, then one name per class."""
    names = class_names(structure_kinds(num_classes))
    return {"background": 0, **{name: label for label, name in enumerate(names, start=1)}}


# ------------------------------------------------------------------------------------------- layout
def case_grid(spec: PhantomSpec, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape (Z, Y, X) and spacing (mm) of one case: sampled at scale 1, then ``scale`` applied so the
    physical extent (shape x spacing) is kept."""
    if spec.scale <= 0:
        raise ValueError(f"scale must be positive, got {spec.scale}")
    slices = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
    slice_spacing = float(rng.uniform(*spec.slice_spacing_mm))
    pixel = float(rng.uniform(*spec.in_plane_spacing_mm))
    full = (slices, spec.in_plane, spec.in_plane)
    full_spacing = (slice_spacing, pixel, pixel)
    shape = tuple(max(8, int(round(n * spec.scale))) for n in full)
    spacing = tuple(n * s / m for n, s, m in zip(full, full_spacing, shape))
    return shape, spacing  # type: ignore[return-value]


def _cavity_semi_axes(body: Body) -> tuple[float, float]:
    return (body.semi_axes[0] - body.fat_mm - body.muscle_mm, body.semi_axes[1] - body.fat_mm - body.muscle_mm)


def _sample_body(rng: np.random.Generator, extent: Sequence[float]) -> Body:
    extent_z, extent_y, extent_x = extent
    semi = (extent_y * rng.uniform(0.28, 0.32), extent_x * rng.uniform(0.40, 0.44))
    centre = (extent_y * rng.uniform(0.48, 0.52), extent_x * rng.uniform(0.48, 0.52))
    return Body(
        centre=centre, semi_axes=semi,
        variation=(float(rng.uniform(0.02, 0.05)), float(rng.uniform(200.0, 500.0)), float(rng.uniform(0, 2 * math.pi))),
        fat_mm=float(rng.uniform(10.0, 30.0)), muscle_mm=float(rng.uniform(8.0, 15.0)),
        fat_hu=float(rng.uniform(*HU_RANGES["fat"])), muscle_hu=float(rng.uniform(*HU_RANGES["muscle"])),
        soft_tissue_hu=float(rng.uniform(*HU_RANGES["soft_tissue"])),
        spine_period_mm=float(rng.uniform(25.0, 32.0)), disc_mm=float(rng.uniform(5.0, 8.0)),
        rib_period_mm=float(rng.uniform(22.0, 30.0)), rib_mm=float(rng.uniform(8.0, 11.0)),
        rib_z_end=float(extent_z * rng.uniform(0.35, 0.5)),
    )


def _far_enough(centre: Sequence[float], reach: Sequence[float], placed: list[tuple[Sequence[float], Sequence[float]]]) -> bool:
    """True when ``centre`` lies at least half the summed reach (z, in-plane) from every placed centre along Z
    or in-plane: a later structure can then never cover an earlier one of similar size completely."""
    for other, other_reach in placed:
        dz = abs(centre[0] - other[0])
        dxy = math.hypot(centre[1] - other[1], centre[2] - other[2])
        if dz < 0.5 * (reach[0] + other_reach[0]) and dxy < 0.5 * (reach[1] + other_reach[1]):
            return False
    return True


def _in_cavity_point(rng: np.random.Generator, body: Body, rho_max: float, avoid: tuple[float, float, float]) -> tuple[float, float]:
    """An in-plane point (y, x) inside the cavity ellipse scaled by ``rho_max``, away from ``avoid``
    ((y, x, radius): the spine) when possible."""
    cay, cax = _cavity_semi_axes(body)
    point = body.centre
    for _ in range(50):
        radius, theta = rho_max * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        point = (body.centre[0] + radius * cay * math.sin(theta), body.centre[1] + radius * cax * math.cos(theta))
        if math.hypot(point[0] - avoid[0], point[1] - avoid[1]) > avoid[2]:
            break
    return point


def make_layout(spec: PhantomSpec, index: int) -> Layout:
    """Decide one case: grid, body, and every structure's position, size and HU. Pure in ``(spec, index)``."""
    rng = np.random.default_rng([spec.seed, index])
    shape, spacing = case_grid(spec, rng)
    extent = [n * s for n, s in zip(shape, spacing)]
    body = _sample_body(rng, extent)
    kinds = structure_kinds(spec.num_classes)
    names = class_names(kinds)
    # at coarse scale a structure thinner than a voxel may vanish: widen it to one voxel of its axis
    min_z = spacing[0] if spec.keep_thin_structures else 0.0
    min_xy = max(spacing[1], spacing[2]) if spec.keep_thin_structures else 0.0
    cay, cax = _cavity_semi_axes(body)
    spine_semi = (float(rng.uniform(14.0, 18.0)), float(rng.uniform(18.0, 24.0)))
    spine_centre = (body.centre[0] + cay - spine_semi[0] - 5.0, body.centre[1])
    spine_avoid = (spine_centre[0], spine_centre[1], max(spine_semi) + 25.0)

    structures: list[Structure] = []
    placed_blobs: list[tuple[Sequence[float], Sequence[float]]] = []
    placed_tubes: list[tuple[Sequence[float], Sequence[float]]] = []
    large_vessels = 0
    for label, (kind, name) in enumerate(zip(kinds, names), start=1):
        tissue = KIND_TISSUE[kind]
        hu = float(rng.uniform(*HU_RANGES[tissue]))
        if kind in ORGAN_SEMI_AXES_MM:
            (z_lo, z_hi), (a_lo, a_hi), (b_lo, b_hi) = ORGAN_SEMI_AXES_MM[kind]
            semi = (max(float(rng.uniform(z_lo, z_hi)), min_z), max(float(rng.uniform(a_lo, a_hi)), min_xy),
                    max(float(rng.uniform(b_lo, b_hi)), min_xy))
            rho_max = {"large_organ": 0.45, "medium_organ": 0.6, "small_organ": 0.65}[kind]
            z_margin = {"large_organ": 0.2, "medium_organ": 0.12, "small_organ": 0.08}[kind]
            reach = (semi[0], max(semi[1:]))
            centre = (0.0, 0.0, 0.0)
            for _ in range(200):  # rejection sampling; the last draw is kept if none is far enough
                z = float(rng.uniform(z_margin, 1 - z_margin)) * extent[0]
                y, x = _in_cavity_point(rng, body, rho_max, spine_avoid)
                centre = (z, y, x)
                if _far_enough(centre, reach, placed_blobs):
                    break
            placed_blobs.append((centre, reach))
            amplitude = ORGAN_BUMP[kind]
            bumps = tuple((amplitude, *rng.normal(0, 2.5, 3).tolist(), float(rng.uniform(0, 2 * math.pi)))
                          for _ in range(3))
            structures.append(Structure(label, name, kind, hu, centre, semi, float(rng.uniform(0, math.pi)), bumps))
        elif kind in ("vessel", "large_vessel"):
            if kind == "large_vessel":
                radius = float(rng.uniform(9.0, 13.0))
                side = -1.0 if large_vessels == 0 else 1.0  # aorta-like to one side of the spine, cava-like to the other
                large_vessels += 1
                y = spine_centre[0] - spine_semi[0] - radius - 4.0
                x = spine_centre[1] + side * (radius + float(rng.uniform(4.0, 12.0)))
                z_range = (0.0, extent[0])
                amplitude = float(rng.uniform(1.0, 4.0))
            else:
                radius = float(rng.uniform(1.0, 3.0))  # 2-6 mm diameter
                amplitude = float(rng.uniform(3.0, 10.0))
                length = extent[0] * float(rng.uniform(0.3, 1.0))
                start = float(rng.uniform(0.0, extent[0] - length))
                z_range = (start, start + length)
                y, x = body.centre
                for _ in range(200):
                    y, x = _in_cavity_point(rng, body, 0.75, spine_avoid)
                    if _far_enough((0.0, y, x), (extent[0], radius + amplitude), placed_tubes):
                        break
            radius = max(radius, min_xy)
            placed_tubes.append(((0.0, y, x), (extent[0], radius + amplitude)))
            wiggle = (amplitude, amplitude, float(rng.uniform(80.0, 200.0)), float(rng.uniform(0, 2 * math.pi)),
                      float(rng.uniform(0, 2 * math.pi)))
            structures.append(Structure(label, name, kind, hu, (extent[0] / 2, y, x), radius=radius, wiggle=wiggle,
                                        z_range=z_range))
        elif kind == "spine":
            hu = float(rng.uniform(900.0, 1200.0))  # cortical shell
            inner = float(rng.uniform(300.0, 450.0))  # cancellous core
            semi = (extent[0], max(spine_semi[0], min_xy), max(spine_semi[1], min_xy))
            structures.append(Structure(label, name, kind, hu, (extent[0] / 2, *spine_centre), semi, inner_hu=inner))
        else:  # ribs
            hu = float(rng.uniform(500.0, 900.0))
            thickness = (max(body.rib_mm, min_z), max(body.rib_mm, min_xy))
            structures.append(Structure(label, name, kind, hu, (0.0, *body.centre), semi_axes=(thickness[0], thickness[1], 0.0)))
    order = {kind: rank for rank, kind in enumerate(PAINT_ORDER)}
    structures.sort(key=lambda s: (order[s.kind], s.label))
    labels = {"background": 0, **{name: label for label, name in enumerate(names, start=1)}}
    return Layout(shape, spacing, body, tuple(structures), spec.noise_hu, (spec.seed, index), labels)


# ------------------------------------------------------------------------------------------ drawing
def _centres(first: int, count: int, spacing: float) -> np.ndarray:
    """Physical positions (mm) of voxel centres ``first .. first + count - 1`` along one axis, float32."""
    return ((np.arange(first, first + count, dtype=np.float32) + 0.5) * np.float32(spacing))


def _index_range(low_mm: float, high_mm: float, spacing: float, size: int) -> tuple[int, int]:
    """Voxel indices whose centres may lie in [low_mm, high_mm], clipped to the array."""
    return max(0, int(math.floor(low_mm / spacing - 0.5))), min(size, int(math.ceil(high_mm / spacing + 0.5)))


def body_semi_axes(body: Body, z_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body's semi-axes (y, x) in mm at heights ``z_mm`` ``[n]``: a slow sine around the mid value."""
    amplitude, wavelength, phase = body.variation
    factor = 1.0 + amplitude * np.sin(2 * np.pi * z_mm / wavelength + phase)
    return body.semi_axes[0] * factor, body.semi_axes[1] * factor


def _ellipse_rho2(y: np.ndarray, x: np.ndarray, centre: tuple[float, float], ay: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """Squared normalised radius ``((y-cy)/ay)^2 + ((x-cx)/ax)^2``; ``ay``/``ax`` per slice ``[n, 1, 1]``."""
    return ((y - centre[0]) / ay) ** 2 + ((x - centre[1]) / ax) ** 2


def render_slab(layout: Layout, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``z0:z1`` of a case: HU ``[n, Y, X]`` int16 (with noise) and label ``[n, Y, X]`` uint8."""
    _, ny, nx = layout.shape
    sz, sy, sx = layout.spacing
    body = layout.body
    z = _centres(z0, z1 - z0, sz)
    y = _centres(0, ny, sy)[None, :, None]
    x = _centres(0, nx, sx)[None, None, :]
    ay, ax = body_semi_axes(body, z)
    ay, ax = ay[:, None, None].astype(np.float32), ax[:, None, None].astype(np.float32)
    hu = np.full((z1 - z0, ny, nx), AIR_HU, np.float32)
    label = np.zeros((z1 - z0, ny, nx), np.uint8)
    hu[_ellipse_rho2(y, x, body.centre, ay, ax) < 1.0] = body.fat_hu
    muscle_ay, muscle_ax = ay - body.fat_mm, ax - body.fat_mm
    hu[_ellipse_rho2(y, x, body.centre, muscle_ay, muscle_ax) < 1.0] = body.muscle_hu
    cavity_ay, cavity_ax = muscle_ay - body.muscle_mm, muscle_ax - body.muscle_mm
    cavity = _ellipse_rho2(y, x, body.centre, cavity_ay, cavity_ax) < 1.0
    hu[cavity] = body.soft_tissue_hu
    for structure in layout.structures:
        if structure.kind in ORGAN_SEMI_AXES_MM:
            _draw_blob(structure, layout, z0, z1, hu, label, cavity)
        elif structure.kind in ("vessel", "large_vessel"):
            _draw_tube(structure, layout, z0, z1, hu, label)
        elif structure.kind == "spine":
            _draw_spine(structure, layout, z, hu, label)
        else:
            _draw_ribs(structure, layout, z, y, x, ay, ax, hu, label)
    if layout.noise_hu > 0:
        rng = np.random.default_rng([layout.seed[0], layout.seed[1], 1, z0])
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(layout.noise_hu)
    np.clip(hu, -1024, 3071, out=hu)  # the 12-bit range CT scanners store
    return np.rint(hu).astype(np.int16), label


def _box(structure: Structure, reach: Sequence[float], layout: Layout, z0: int, z1: int) -> tuple[slice, slice, slice] | None:
    """The slab-relative index box holding ``centre +- reach`` (mm), or None when it misses the slab."""
    bounds = []
    for axis, (centre, extent) in enumerate(zip(structure.centre, reach)):
        size = layout.shape[axis]
        low, high = _index_range(centre - extent, centre + extent, layout.spacing[axis], size)
        if axis == 0:
            low, high = max(low, z0), min(high, z1)
        if high <= low:
            return None
        bounds.append((low, high))
    (za, zb), (ya, yb), (xa, xb) = bounds
    return slice(za - z0, zb - z0), slice(ya, yb), slice(xa, xb)


def _draw_blob(structure: Structure, layout: Layout, z0: int, z1: int, hu: np.ndarray, label: np.ndarray,
               cavity: np.ndarray) -> None:
    """A deformed ellipsoid: inside where ``|u| < 1 + sum_k a_k sin(w_k . u + phase_k)``, ``u`` the point in
    the structure's normalised, in-plane-rotated frame; clipped to the cavity."""
    bump = sum(b[0] for b in structure.bumps)
    reach = [s * (1.0 + bump) for s in structure.semi_axes]
    reach = [reach[0], max(reach[1:]), max(reach[1:])]
    box = _box(structure, reach, layout, z0, z1)
    if box is None:
        return
    sz, sy, sx = layout.spacing
    zs = _centres(z0 + box[0].start, box[0].stop - box[0].start, sz)[:, None, None] - structure.centre[0]
    ys = _centres(box[1].start, box[1].stop - box[1].start, sy)[None, :, None] - structure.centre[1]
    xs = _centres(box[2].start, box[2].stop - box[2].start, sx)[None, None, :] - structure.centre[2]
    cos, sin = math.cos(structure.angle), math.sin(structure.angle)
    uz = zs / structure.semi_axes[0]
    ua = (ys * cos + xs * sin) / structure.semi_axes[1]
    ub = (-ys * sin + xs * cos) / structure.semi_axes[2]
    radius = np.sqrt(uz * uz + ua * ua + ub * ub)
    limit = np.ones_like(radius)
    for amplitude, wz, wa, wb, phase in structure.bumps:
        limit += amplitude * np.sin(wz * uz + wa * ua + wb * ub + phase)
    inside = (radius < limit) & cavity[box]
    hu[box][inside] = structure.hu
    label[box][inside] = structure.label


def _tube_centre(structure: Structure, z_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre line (y, x) in mm at heights ``z_mm``."""
    amp_y, amp_x, wavelength, phase_y, phase_x = structure.wiggle
    angle = 2 * np.pi * z_mm / wavelength
    return (structure.centre[1] + amp_y * np.sin(angle + phase_y), structure.centre[2] + amp_x * np.sin(angle + phase_x))


def _draw_tube(structure: Structure, layout: Layout, z0: int, z1: int, hu: np.ndarray, label: np.ndarray) -> None:
    """A vessel: in each slice whose centre lies in ``z_range``, a disc of ``radius`` around the centre line."""
    sz, sy, sx = layout.spacing
    za, zb = _index_range(structure.z_range[0], structure.z_range[1], sz, layout.shape[0])
    za, zb = max(za, z0), min(zb, z1)
    if zb <= za:
        return
    z = _centres(za, zb - za, sz)
    keep = (z >= structure.z_range[0]) & (z <= structure.z_range[1])
    if not keep.any():
        return
    cy, cx = _tube_centre(structure, z)
    reach = structure.radius + max(structure.wiggle[0], structure.wiggle[1])
    ya, yb = _index_range(structure.centre[1] - reach, structure.centre[1] + reach, sy, layout.shape[1])
    xa, xb = _index_range(structure.centre[2] - reach, structure.centre[2] + reach, sx, layout.shape[2])
    ys = _centres(ya, yb - ya, sy)[None, :, None]
    xs = _centres(xa, xb - xa, sx)[None, None, :]
    inside = (ys - cy[:, None, None].astype(np.float32)) ** 2 + (xs - cx[:, None, None].astype(np.float32)) ** 2 \
        < structure.radius ** 2
    inside &= keep[:, None, None]
    box = (slice(za - z0, zb - z0), slice(ya, yb), slice(xa, xb))
    hu[box][inside] = structure.hu
    label[box][inside] = structure.label


def _draw_spine(structure: Structure, layout: Layout, z: np.ndarray, hu: np.ndarray, label: np.ndarray) -> None:
    """Vertebral bodies: an elliptic column (cortical shell 2.5 mm, cancellous core) interrupted by discs
    (muscle HU, unlabelled) where the slices are thin enough to resolve them."""
    _, sy, sx = layout.spacing
    body = layout.body
    _, ry, rx = structure.semi_axes
    ya, yb = _index_range(structure.centre[1] - ry, structure.centre[1] + ry, sy, layout.shape[1])
    xa, xb = _index_range(structure.centre[2] - rx, structure.centre[2] + rx, sx, layout.shape[2])
    ys = _centres(ya, yb - ya, sy)[:, None] - structure.centre[1]
    xs = _centres(xa, xb - xa, sx)[None, :] - structure.centre[2]
    rho2 = (ys / ry) ** 2 + (xs / rx) ** 2
    outer = rho2 < 1.0
    core = (ys / max(ry - 2.5, 1e-3)) ** 2 + (xs / max(rx - 2.5, 1e-3)) ** 2 < 1.0
    # a disc thinner than a slice would be averaged away by a real scanner: only draw it when resolvable
    disc = np.zeros(z.shape, bool)
    if layout.spacing[0] < body.disc_mm:
        disc = np.mod(z, body.spine_period_mm) < body.disc_mm
    for slab_z in np.flatnonzero(~disc):
        plane_hu, plane_label = hu[slab_z, ya:yb, xa:xb], label[slab_z, ya:yb, xa:xb]
        plane_hu[outer] = structure.hu
        plane_hu[core] = structure.inner_hu
        plane_label[outer] = structure.label
    for slab_z in np.flatnonzero(disc):
        hu[slab_z, ya:yb, xa:xb][outer] = body.muscle_hu


def _draw_ribs(structure: Structure, layout: Layout, z: np.ndarray, y: np.ndarray, x: np.ndarray, ay: np.ndarray,
               ax: np.ndarray, hu: np.ndarray, label: np.ndarray) -> None:
    """Rib arcs: in the slices of each rib (period ``rib_period_mm``, thickness ``semi_axes[0]``, only above
    ``rib_z_end``) a band of width ``semi_axes[1]`` mm in the middle of the muscle layer, from the back round
    the sides, open at the front (the sternum gap)."""
    body = layout.body
    in_rib = (np.mod(z, body.rib_period_mm) < structure.semi_axes[0]) & (z < body.rib_z_end)
    if layout.spacing[0] >= body.rib_period_mm:
        in_rib = z < body.rib_z_end  # slices coarser than the rib period: every slice cuts a rib
    slices = np.flatnonzero(in_rib)
    if slices.size == 0:
        return
    middle = body.fat_mm + 0.5 * body.muscle_mm
    half = 0.5 * structure.semi_axes[1]
    sub_ay, sub_ax = ay[slices], ax[slices]
    outer = _ellipse_rho2(y, x, body.centre, sub_ay - middle + half, sub_ax - middle + half) < 1.0
    inner = _ellipse_rho2(y, x, body.centre, sub_ay - middle - half, sub_ax - middle - half) < 1.0
    front_gap = (y < body.centre[0]) & (np.abs(x - body.centre[1]) < 0.25 * sub_ax)
    band = outer & ~inner & ~front_gap
    for position, slab_z in enumerate(slices):
        hu[slab_z][band[position]] = structure.hu
        label[slab_z][band[position]] = structure.label


# ------------------------------------------------------------------------------------------ cases
def layout_geometry(layout: Layout) -> Geometry:
    """Identity direction; origin so the in-plane field of view is centred on 0 (as scanners write it)."""
    nz, ny, nx = layout.shape
    sz, sy, sx = layout.spacing
    origin = (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, 0.0)  # physical order x, y, z
    return Geometry(shape=layout.shape, spacing=layout.spacing, origin=origin,
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def render_case(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The whole case: HU ``[Z, Y, X]`` int16 and label ``[Z, Y, X]`` uint8, rendered slab by slab."""
    image = np.empty(layout.shape, np.int16)
    label = np.empty(layout.shape, np.uint8)
    for z0 in range(0, layout.shape[0], SLAB):
        z1 = min(z0 + SLAB, layout.shape[0])
        image[z0:z1], label[z0:z1] = render_slab(layout, z0, z1)
    return image, label


def make_ct_phantom(spec: PhantomSpec, index: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Case ``index``: HU ``[Z, Y, X]`` int16, label ``[Z, Y, X]`` uint8 (0..num_classes) and its geometry."""
    layout = make_layout(spec, index)
    image, label = render_case(layout)
    return image, label, layout_geometry(layout)


def missing_classes(label: np.ndarray, num_classes: int) -> list[int]:
    """Foreground labels 1..num_classes with no voxel in ``label`` ``[Z, ...]``. Counted slab by slab:
    ``np.bincount`` widens to int64, which for a whole 512 x 512 x 800 label would be 1.7 GB."""
    counts = np.zeros(max(num_classes + 1, int(label.max(initial=0)) + 1), np.int64)
    for z0 in range(0, label.shape[0], SLAB):
        part = np.bincount(label[z0:z0 + SLAB].ravel(), minlength=counts.size)
        counts += part
    return [k for k in range(1, num_classes + 1) if counts[k] == 0]


def generate_ct_phantoms(out_dir: str | os.PathLike, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write a raw dataset in the nnU-Net v2 layout: ``dataset.json`` (channel "CT", named labels),
    ``imagesTr/case_XXX_0000<ending>`` and ``labelsTr/case_XXX<ending>``, one case in memory at a time."""
    out = Path(out_dir)
    labels = dataset_labels(spec.num_classes)
    for index in range(spec.num_cases):
        image, label, geometry = make_ct_phantom(spec, index)
        missing = missing_classes(label, spec.num_classes)
        if missing:
            logger.warning("phantom case %d: classes %s have no voxel at spacing %s (thin structures vanish at "
                           "coarse scale; keep_thin_structures=True keeps them)", index, missing, geometry.spacing)
        case_id = f"case_{index:03d}"
        write_image(image, geometry, out / IMAGES_TRAIN / f"{case_id}_0000{spec.file_ending}")
        write_segmentation(label, geometry, out / LABELS_TRAIN / f"{case_id}{spec.file_ending}")
        del image, label
    write_json(out / DATASET_JSON, {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": spec.num_cases,
        "file_ending": spec.file_ending,
        "name": out.name,
        "description": f"autoseg CT phantoms: {spec.num_classes} classes, seed {spec.seed}, scale {spec.scale}",
    })
    return out
