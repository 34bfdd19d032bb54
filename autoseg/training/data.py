"""Random training patches from the preprocessed store.

The store keeps every case as a ``[C, Z, Y, X]`` array (2D images: Z = 1), a blosc2 ``.b2nd`` or a ``.npy``
(``autoseg.preprocessing.store``), opened lazily so that a patch reads (and for b2nd decompresses) only its
own region. Rules of the nnU-Net method (Isensee et al., Nature Methods 2021):

- 33 % of each batch is *foreground-oversampled*: the patch is centred on a stored location
  (``CaseProperties.class_locations``) of a randomly chosen class present in the case. The last
  ``round(0.33 * batch)`` samples of a batch are the forced ones, as in the reference.
- The patch is sampled larger than the network patch (:func:`enlarged_patch_size`) so that rotation and
  scaling do not pull in padding; the spatial augmentation then centre-crops to the network patch.
- 2D configurations sample one slice ``[C, Y, X]`` of the 4D store.
- Deep-supervision targets: the label downsampled (nearest) to each network output's scale.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.errors import PreprocessingError
from autoseg.preprocessing.store import CaseProperties, array_file, load_properties, open_array
from autoseg.training.cascade import load_previous_stage

log = logging.getLogger(__name__)

FOREGROUND_OVERSAMPLING = 0.33  # nnU-Net: a third of each batch is centred on foreground
# nnU-Net computes the enlarged patch with scale 0.85 (not the 0.7 of the scaling augmentation): zooming out
# further than that pulls in a little padding, which the reference accepts to keep patches small
ENLARGEMENT_SCALE = 0.85
# Cases whose arrays a sampler keeps open, most recently used first. An open blosc2 array holds a file
# descriptor, so keeping every case of a 1000-case dataset open (2 files each, per loader worker) would run
# into the usual limit of 1024 descriptors per process; reopening costs ~5 ms (measured on the dev machine)
# against ~80-130 ms to read the 206^3 sample of a 128^3 patch (benchmarks/bench_storage.py).
OPEN_CASES = 64


def _rotation_matrix(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    others = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    i, j = others
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def enlarged_patch_size(
    patch_size: Sequence[int],
    max_angles: Sequence[float],
    min_scale: float = ENLARGEMENT_SCALE,
) -> tuple[int, ...]:
    """The patch to sample so that rotating by up to ``max_angles`` (radians, one per rotation axis: 1 in
    2D, 3 in 3D) and zooming out to ``min_scale`` still fits, in voxels, same axis order as ``patch_size``.

    Takes the axis-aligned extent of the patch box rotated by each angle in [0, max] (checked on a grid of
    angles, the extent is not monotonic beyond 45 degrees), never smaller than the patch itself.
    """
    patch = np.asarray(patch_size, dtype=float)
    dims = len(patch)
    extent = patch.copy()
    if dims == 2:
        for angle in np.linspace(0.0, float(max_angles[0]), 19):
            c, s = abs(math.cos(angle)), abs(math.sin(angle))
            extent = np.maximum(extent, [c * patch[0] + s * patch[1], s * patch[0] + c * patch[1]])
    else:
        corners = np.array([[sz, sy, sx] for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)]) * patch / 2
        for axis in range(3):
            for angle in np.linspace(0.0, float(max_angles[axis]), 7):
                rotated = corners @ _rotation_matrix(axis, angle).T
                extent = np.maximum(extent, rotated.max(0) - rotated.min(0))
    extent = extent / min_scale
    return tuple(int(math.ceil(e - 1e-6)) for e in extent)


def downsample_label(label: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Nearest-neighbour downsampling of ``label [B, 1, *S]`` by ``scale`` per spatial axis (e.g. 0.5).

    Output shape ``[B, 1, *round(S * scale)]``; output voxel i takes input voxel ``floor((i + 0.5) / scale)``
    (the input voxel whose centre is nearest the output voxel's centre).
    """
    out = label
    for axis, factor in enumerate(scale):
        if factor == 1:
            continue
        size = label.shape[axis + 2]
        new_size = max(1, int(round(size * factor)))
        index = np.minimum(((np.arange(new_size) + 0.5) * (size / new_size)).astype(np.int64), size - 1)
        out = np.take(out, index, axis=axis + 2)
    return np.ascontiguousarray(out)


def deep_supervision_targets(label: np.ndarray, scales: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """One target per network output: ``label [B, 1, *S]`` at each of ``scales`` (highest resolution first)."""
    return [downsample_label(label, s) for s in scales]


def forced_foreground(sample_index: int, batch_size: int, fraction: float = FOREGROUND_OVERSAMPLING) -> bool:
    """Whether sample ``sample_index`` of a batch must be centred on foreground (the last ``round(f*B)``)."""
    return not sample_index < round(batch_size * (1.0 - fraction))


def _forget_oldest(opened: OrderedDict) -> None:
    """Close (by dropping) the least recently used arrays beyond ``OPEN_CASES``."""
    while len(opened) > OPEN_CASES:
        opened.popitem(last=False)


@dataclass
class _Case:
    case_id: str
    properties: CaseProperties
    shape: tuple[int, int, int]  # stored Z, Y, X
    foreground: dict[str, np.ndarray]  # label -> [N, 3] locations (only non-empty classes)


class PatchSampler:
    """Draws batches ``{"data": float32 [B, C, *sample], "seg": float32 [B, S, *sample]}`` from the store.

    ``sample_size`` is the (enlarged) size to read, in network axes (2 or 3 entries); ``dims`` 2 samples
    single slices. Arrays are opened lazily per process (safe with fork and spawn workers).
    ``previous_stage``: a cascade's folder of previous-stage segmentations (``autoseg.training.cascade``),
    read into ``seg`` channel 1 so the spatial augmentation moves them with the label (then S = 2, else 1).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        case_ids: Sequence[str],
        sample_size: Sequence[int],
        batch_size: int,
        dims: int,
        oversample_foreground: float = FOREGROUND_OVERSAMPLING,
        previous_stage: str | os.PathLike | None = None,
    ) -> None:
        if not case_ids:
            raise ValueError("PatchSampler needs at least one case")
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.sample_size = tuple(int(s) for s in sample_size)
        self.batch_size = int(batch_size)
        self.dims = int(dims)
        self.oversample_foreground = oversample_foreground
        self.previous_stage = Path(previous_stage) if previous_stage is not None else None
        self.cases = [self._describe(c) for c in self.case_ids]
        self._arrays: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._previous: OrderedDict[str, np.ndarray] = OrderedDict()

    def _describe(self, case_id: str) -> _Case:
        properties = load_properties(self.folder, case_id)
        foreground = {
            label: np.asarray(locations, dtype=np.int64).reshape(-1, 3)
            for label, locations in properties.class_locations.items()
            if locations and int(label) > 0
        }
        return _Case(case_id, properties, tuple(int(s) for s in properties.shape_after_resampling), foreground)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"], state["_previous"] = OrderedDict(), OrderedDict()  # reopened in each worker
        return state

    def arrays(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The case's image and label, opened lazily (memory map or blosc2 NDArray; both slice like numpy).
        One blosc2 thread per reader: a patch is a few MB, and the loader runs one sampler per worker process,
        so more threads would only make the workers fight over the same cores."""
        if case_id not in self._arrays:
            files = array_file(self.folder, case_id), array_file(self.folder, f"{case_id}_seg")
            if None in files:
                raise PreprocessingError(
                    f"{self.folder / case_id}: image or label array (.b2nd or .npy) missing; "
                    "re-run `autoseg preprocess`, which redoes incomplete cases"
                )
            self._arrays[case_id] = (open_array(files[0], nthreads=1), open_array(files[1], nthreads=1))
            _forget_oldest(self._arrays)
        self._arrays.move_to_end(case_id)
        return self._arrays[case_id]

    def previous(self, case_id: str) -> np.ndarray:
        """The cascade's previous-stage segmentation ``[1, Z, Y, X]`` of a case (opened lazily)."""
        if case_id not in self._previous:
            assert self.previous_stage is not None
            self._previous[case_id] = load_previous_stage(self.previous_stage, case_id, mmap=True)
            _forget_oldest(self._previous)
        self._previous.move_to_end(case_id)
        return self._previous[case_id]

    @property
    def seg_channels(self) -> int:
        return 1 if self.previous_stage is None else 2

    def _bounds(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Lowest and highest patch start per axis: a patch may hang over the border by half the padding
        the image needs to reach the patch size (the reference's rule), so small images are centred."""
        low, high = [], []
        for size, patch in zip(shape, self.sample_size):
            need = max(0, patch - size)
            low.append(-(need // 2))
            high.append(size + need // 2 + need % 2 - patch)
        return low, high

    def sample_patch(
        self,
        rng: np.random.Generator,
        force_foreground: bool,
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """One patch ``(data [C, *sample], seg [S, *sample], case_id)``; regions outside the image are 0.

        ``out``: zero-filled ``(data, seg)`` arrays of those shapes to read into (what :meth:`sample_batch`
        passes, so a patch is copied once, from the memory map into the batch); new arrays when omitted.
        """
        case = self.cases[int(rng.integers(len(self.cases)))]
        data, seg = self.arrays(case.case_id)
        location = None
        if force_foreground and case.foreground:
            label = list(case.foreground)[int(rng.integers(len(case.foreground)))]
            points = case.foreground[label]
            location = points[int(rng.integers(len(points)))]
        if self.dims == 2:
            z = int(location[0]) if location is not None else int(rng.integers(case.shape[0]))
            spatial_shape, centre = case.shape[1:], (location[1:] if location is not None else None)
        else:
            z, spatial_shape, centre = None, case.shape, location
        low, high = self._bounds(spatial_shape)
        if centre is not None:
            start = [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.sample_size, low, high)]
        else:
            start = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]
        if out is None:
            out = (np.zeros((data.shape[0], *self.sample_size), dtype=np.float32),
                   np.zeros((self.seg_channels, *self.sample_size), dtype=np.float32))
        if self.previous_stage is not None:
            seg = (seg, self.previous(case.case_id))
        self._read(data, seg, z, spatial_shape, start, *out)
        return (*out, case.case_id)

    def _read(self, data, seg, z, spatial_shape, start, image: np.ndarray, label: np.ndarray) -> None:
        """Copy the part of the patch inside the image from the stored arrays into the zero-filled ``image`` and
        ``label``; the rest stays 0. Small images are mostly padding (a 42x55x44 case in a 78x86x82 sample), so
        writing into the batch array directly instead of np.pad + np.stack saves two copies per sample.
        ``seg`` is the label map, or ``(label map, previous-stage map)`` for a cascade."""
        valid = tuple(slice(max(0, s), min(n, s + p)) for s, n, p in zip(start, spatial_shape, self.sample_size))
        inside = tuple(slice(v.start - s, v.stop - s) for v, s in zip(valid, start))
        prefix = (slice(None),) if z is None else (slice(None), z)
        image[(slice(None),) + inside] = data[prefix + valid]
        for channel, source in enumerate(seg if isinstance(seg, tuple) else (seg,)):
            target = label[(slice(channel, channel + 1),) + inside]
            target[...] = source[prefix + valid]
            np.maximum(target, 0, out=target)  # -1 (outside the nonzero mask) trains as background

    def sample_batch(self, rng: np.random.Generator, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """``{"data": [B, C, *sample], "seg": [B, S, *sample], "keys": case ids}`` with foreground
        oversampling of the last samples."""
        batch_size = batch_size or self.batch_size
        channels = self.arrays(self.case_ids[0])[0].shape[0]
        images = np.zeros((batch_size, channels, *self.sample_size), dtype=np.float32)
        labels = np.zeros((batch_size, self.seg_channels, *self.sample_size), dtype=np.float32)
        keys = []
        for index in range(batch_size):
            force = forced_foreground(index, batch_size, self.oversample_foreground)
            keys.append(self.sample_patch(rng, force, out=(images[index], labels[index]))[2])
        return {"data": images, "seg": labels, "keys": keys}
