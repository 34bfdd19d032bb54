"""What prediction writes per case, and how it is read back (ensembles, evaluation).

    <case><ending>   the segmentation, in the input's format and geometry (autoseg.io.write_segmentation)
    <case>.npz       optional softmax probabilities, readable with ``np.load(..., allow_pickle=False)``
                     (written whole by write_probabilities, or filled slab by slab via probabilities_file):
                       "probabilities"  float16 [K, *original shape]   (docs/internals.md)
                       "geometry"       0-d unicode array: Geometry.to_json() as a JSON string
                       "file_ending"    0-d unicode array: the segmentation's ending, e.g. ".nii.gz"

The two extra keys make a probabilities file self-contained, so `autoseg ensemble` can write segmentations
with the right geometry and format without the original images. Files with only "probabilities" (older
validation outputs) fall back to the geometry of the segmentation file next to them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from autoseg.errors import ImageReadError
from autoseg.fileio import atomic_path
from autoseg.io import SUPPORTED_ENDINGS, Geometry, read_segmentation

PROBABILITIES_KEY = "probabilities"
GEOMETRY_KEY = "geometry"
ENDING_KEY = "file_ending"


def write_probabilities(
    path: str | os.PathLike, probabilities: np.ndarray, geometry: Geometry, file_ending: str
) -> None:
    """Write ``<case>.npz`` atomically: float16 probabilities ``[K, *geometry.shape]`` plus geometry/ending."""
    if tuple(probabilities.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"probabilities {probabilities.shape} do not match geometry shape {geometry.shape}")
    path = Path(path)
    arrays = {
        PROBABILITIES_KEY: np.ascontiguousarray(probabilities, dtype=np.float16),
        GEOMETRY_KEY: np.array(json.dumps(geometry.to_json(), sort_keys=True)),
        ENDING_KEY: np.array(file_ending),
    }
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


@contextlib.contextmanager
def probabilities_file(
    path: str | os.PathLike, shape: Sequence[int], geometry: Geometry, file_ending: str
) -> Iterator[np.ndarray]:
    """Yield a writable float16 array ``shape`` = ``[K, *geometry.shape]`` backed by a temporary ``.npy`` file
    beside ``path``; when the block ends without error, pack it into ``path`` in the format of
    :func:`write_probabilities` (a deflate-compressed zip of ``.npy`` members, as ``np.savez_compressed``
    writes, read back by ``np.load(..., allow_pickle=False)``), atomically; the temporary file is removed.

    For predictions too big for memory: the caller fills the array slab by slab and the operating system
    pages it out to disk, so the probabilities of a 50-class CT never sit in RAM (the disk needs
    ``2 * K * voxels`` bytes for the temporary file besides the compressed result).
    """
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    if shape[1:] != tuple(geometry.shape):
        raise ValueError(f"probabilities {shape} do not match geometry shape {geometry.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial.npy", dir=path.parent)
    os.close(handle)
    scratch = Path(scratch_name)
    try:
        array = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float16, shape=shape)
        yield array
        array.flush()
        del array
        extras = {
            GEOMETRY_KEY: np.array(json.dumps(geometry.to_json(), sort_keys=True)),
            ENDING_KEY: np.array(file_ending),
        }
        with atomic_path(path, suffix=".npz") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
                member_name = f"{PROBABILITIES_KEY}.npy"
                with open(scratch, "rb") as source, archive.open(member_name, "w", force_zip64=True) as member:
                    shutil.copyfileobj(source, member, 1 << 20)  # small chunks: bounded memory
                for key, value in extras.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


def read_probabilities(path: str | os.PathLike) -> tuple[np.ndarray, Geometry, str]:
    """``(probabilities float32 [K, ...], geometry, file_ending)`` of a ``<case>.npz``.

    Without stored geometry, the segmentation ``<case><ending>`` beside it provides geometry and ending.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if PROBABILITIES_KEY not in npz.files:
                raise ImageReadError(
                    f"{path}: expected key '{PROBABILITIES_KEY}', found {npz.files}; write it with "
                    "`autoseg predict --save-probabilities`"
                )
            probabilities = npz[PROBABILITIES_KEY].astype(np.float32)
            geometry_json = str(npz[GEOMETRY_KEY]) if GEOMETRY_KEY in npz.files else None
            ending = str(npz[ENDING_KEY]) if ENDING_KEY in npz.files else None
    except (OSError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: cannot be read as an .npz probabilities file ({exc}); re-run the prediction") from exc
    if geometry_json is not None and ending is not None:
        return probabilities, Geometry.from_json(json.loads(geometry_json)), ending
    case_id = path.name[: -len(".npz")]
    for candidate_ending in SUPPORTED_ENDINGS:
        segmentation = path.with_name(case_id + candidate_ending)
        if segmentation.is_file():
            _, geometry = read_segmentation(segmentation)
            return probabilities, geometry, candidate_ending
    raise ImageReadError(
        f"{path}: stores no geometry and no segmentation {case_id}<ending> lies beside it; re-run "
        "`autoseg predict --save-probabilities` so the file carries its geometry"
    )
