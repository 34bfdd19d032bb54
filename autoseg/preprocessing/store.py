"""The preprocessed store: one folder per data identifier, per case an image array, a label array and a
JSON of properties. No pickle anywhere: JSON, ``np.load(..., allow_pickle=False)``, and blosc2 opened in its
safe mode and accepted only as a plain ``NDArray``.

    preprocessed/<dataset>/<data_identifier>/<case>.b2nd       float32 [C, Z, Y, X]   (or <case>.npy)
    preprocessed/<dataset>/<data_identifier>/<case>_seg.b2nd   int8    [1, Z, Y, X]   (or <case>_seg.npy)
    preprocessed/<dataset>/<data_identifier>/<case>.json       CaseProperties

Two array formats, chosen per file by the suffix found on disk, so a store written by an earlier version
(``.npy``) still loads and a rerun can convert it case by case:

- ``b2nd`` (the default for new preprocessing): a blosc2 NDArray, compressed in chunks and blocks shaped
  from the configuration's patch size (:func:`blosc2_chunking`), opened lazily (memory-mapped where the OS
  allows) so a patch read decompresses only the blocks it touches. The numbers behind the choice are in
  docs/benchmarks.md ("Preprocessed storage").
- ``npy``: uncompressed, memory-mapped: 2.3x the disk of b2nd; reads a training sample 1.6-1.9x faster
  from the page cache and about as fast from disk (0.9-1.2x). With b2nd, reading stays a small part of a
  loader worker's time next to the augmentation (same page).

Stored arrays are always 4D: 2D images get a leading Z axis of size 1, so one loader serves every
configuration (2D configurations sample single slices). Each array is written to a temporary name in the
same folder, reopened and checked (shape, dtype) and only then renamed; the JSON is written last: a case is
complete exactly when its JSON exists and the arrays it names load with the shapes it records.

A case is also *current* only when it was made from what is there today: the case JSON records its
``provenance`` (a content digest of every input file and a digest of the plan entries that shape
preprocessing, see :func:`case_provenance`), and :func:`is_complete` given today's provenance calls a case
with another one (or none: JSONs written before the field) incomplete, so a rerun redoes it. Size and
modification time would not do: an image edited in place with its time preserved (``cp -p``, ``rsync -t``,
a restore from backup) keeps both. Hashing the bytes (blake2b, ~1 GB/s) costs less than reading and
resampling the same image, which every redo does anyway.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from autoseg.errors import PreprocessingError
from autoseg.fileio import atomic_path, atomic_write, read_json
from autoseg.io import Geometry

PROPERTIES_SCHEMA_VERSION = 1


@dataclass
class CaseProperties:
    """Everything needed to map a preprocessed case back onto its original image grid.

    Shapes, spacings and the crop box are in the stored (4D minus channel) axis order ``Z, Y, X``, which is
    the raw order transposed by ``transpose_forward`` (``geometry`` alone stays in the raw order); for 2D
    images the leading axis has size 1 and spacing ``original_spacing[0]`` is a placeholder.
    """

    case_id: str
    geometry: Geometry  # of the original image file (2D or 3D)
    original_spacing: list[float]  # 3 entries, Z first
    shape_before_crop: list[int]  # 3 entries
    bbox: list[list[int]]  # crop box [[start, stop] per axis] in the original (3-entry) grid
    shape_after_crop: list[int]
    spacing_after_resampling: list[float]
    shape_after_resampling: list[int]
    # raw array axes in the working order above (Plans.transpose_forward as applied); None: identity
    transpose_forward: list[int] | None = None
    # foreground class -> [[z, y, x], ...]; keys are label values ("2") or, for region datasets, a region's
    # values joined by commas ("1,2,3"); background and ignore never have an entry
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict)
    # datasets with an ignore label: annotated voxels (background included) to centre patches on; empty when
    # the dataset has none (every voxel annotated) and in JSONs written before the field (same schema version)
    annotated_locations: list[list[int]] = field(default_factory=list)
    # what the case was made from (case_provenance); None in JSONs written before the field, which makes a
    # rerun redo the case rather than trust it (optional field: same schema version, old JSONs still load)
    provenance: dict[str, Any] | None = None
    schema_version: int = PROPERTIES_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        # shallow on purpose: every field is already JSON-able, and dataclasses.asdict would deep-copy the
        # tens of thousands of class-location triples one by one (most of a small case's preprocessing time)
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["geometry"] = self.geometry.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CaseProperties":
        if data.get("schema_version") != PROPERTIES_SCHEMA_VERSION:
            raise PreprocessingError(
                f"case properties schema {data.get('schema_version')!r} is not {PROPERTIES_SCHEMA_VERSION}; "
                "re-run `autoseg preprocess`"
            )
        fields = dict(data)
        fields["geometry"] = Geometry.from_json(data["geometry"])
        return cls(**fields)


def properties_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def properties_text(properties: CaseProperties) -> str:
    """The case JSON: one top-level key per line (sorted), each value compact on its line.

    Deterministic like ``autoseg.fileio.write_json`` and still readable, but without its indented layout,
    which puts every coordinate of the ~10,000 class locations per class on a line of its own and can only
    use Python's slow JSON encoder (the C encoder serves compact output only).
    """
    data = properties.to_json()
    lines = [f"  {json.dumps(key)}: {json.dumps(data[key], sort_keys=True)}" for key in sorted(data)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ------------------------------------------------------------------------------------------ array formats
ARRAY_FORMATS = ("b2nd", "npy")  # also the order in which open_array looks for a file
DEFAULT_ARRAY_FORMAT = "b2nd"

# blosc2 settings of the b2nd format, chosen from benchmarks/bench_storage.py (docs/benchmarks.md, "Preprocessed
# storage": 4 CT-like cases of 400x512x512, the 206^3 samples the loader reads for a 128^3 patch, three runs).
# LZ4 level 5 read 1.8-2.0x as many samples per second as ZSTD level 1 (7.5 vs 3.7 warm, 4.0 vs 2.6 cold in
# the last run) for 16 % more disk (231 vs 199 MB a case; npy 524 MB): every sample is decompressed afresh.
BLOSC2_CODEC = "LZ4"
BLOSC2_CLEVEL = 5
# shuffle groups the bytes of each float by significance, so the sign/exponent bytes (almost constant in a
# z-scored image) compress to nearly nothing while the noisy mantissa bytes are left alone
BLOSC2_FILTER = "SHUFFLE"
# Blocks are what blosc2 decompresses one at a time: a read decompresses every block it touches (a block edge
# b adds up to b voxels of wasted work per axis) and nothing else of the chunk. On the benchmark's CT-like
# float32 data (LZ4-5, 64^3 chunks) blocks of 8 to 128 KiB compressed alike (0.552-0.556 of the raw bytes) and
# 16^3 voxels (16 KiB) read 96^3 and 128^3 patches fastest (241 vs 171 and 90 vs 80 per second against 64 KiB).
# Reading 206^3 samples, 64 KiB blocks were faster from disk in all three runs (7.0, 7.1, 4.6 vs 6.3, 4.8,
# 4.0 samples/s) but slower from the page cache in two (13.1, 11.7, 6.4 vs 11.8, 12.8, 7.5): a near tie that
# warm reads, the usual case when the dataset fits in RAM, decide. Hence a quarter of the patch per axis as a
# power of two, halved along the longest axis down to 16 KiB.
BLOCK_FRACTION_OF_PATCH = 0.25
MAX_BLOCK_BYTES = 16 * 1024
MIN_BLOCK_EDGE = 16  # where the patch allows: shorter runs only add per-block overhead
# Chunks are blosc2's unit of file index and of disk reads. One patch per axis: a 206^3 sample then spans 2-3
# chunks per axis. Patch-sized and half-patch chunks read alike in the three runs (warm 12.3, 13.9, 7.5 vs 11.8,
# 12.8, 7.6 samples/s; cold 6.5, 6.6, 4.0 vs 6.3, 4.8, 4.0), and patch-sized ones are 8x fewer to index.
CHUNK_FRACTION_OF_PATCH = 1.0
# for arrays saved without a patch size: a typical 3D patch. Not the whole volume: blosc2 chunks hold at most
# 2 GB, which one channel of a long whole-body CT exceeds
DEFAULT_PATCH_SIZE = (128, 128, 128)

StoredArray = Union[np.ndarray, "blosc2.NDArray"]  # noqa: F821 - blosc2 is imported where it is used


def _floor_power_of_two(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, value)))))


def blosc2_chunking(
    shape: Sequence[int], patch_size: Sequence[int], itemsize: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(chunks, blocks)`` for a stored array ``shape = [C, Z, Y, X]`` read in patches of ``patch_size``
    (voxels, ``[Z, Y, X]``, or ``[Y, X]`` for 2D configurations, which read one slice) with ``itemsize``
    bytes per voxel. Channel axis 1 in both, so a channel is never decompressed for another.

    Blocks: per axis the largest power of two <= a quarter of the patch (at least ``MIN_BLOCK_EDGE`` where
    the patch allows), halving the longest block axis until a block holds at most ``MAX_BLOCK_BYTES``.
    Chunks: the patch per axis (``CHUNK_FRACTION_OF_PATCH``), rounded to whole blocks. Both are capped by the
    image (a chunk longer than the image only adds padding). For 2D patches Z is 1 in both. Example: a
    128^3 float32 patch gives blocks [1, 16, 16, 16] (16 KiB) and chunks [1, 128, 128, 128]; see the
    constants for why.
    """
    if len(shape) != 4:
        raise ValueError(f"stored arrays are [C, Z, Y, X]; got shape {tuple(shape)}")
    spatial = [int(s) for s in shape[1:]]
    patch = [1, *patch_size] if len(patch_size) == 2 else list(patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 2 or 3 entries; got {tuple(patch_size)}")
    patch = [max(1, min(int(p), s)) for p, s in zip(patch, spatial)]
    blocks = []
    for p in patch:
        edge = _floor_power_of_two(p * BLOCK_FRACTION_OF_PATCH)
        blocks.append(max(edge, min(MIN_BLOCK_EDGE, _floor_power_of_two(p))))
    while math.prod(blocks) * itemsize > MAX_BLOCK_BYTES and max(blocks) > 1:
        # ties halve Z first: long X runs keep each row a contiguous copy
        longest = max(range(3), key=lambda axis: (blocks[axis], -axis))
        blocks[longest] //= 2
    blocks = [min(b, s) for b, s in zip(blocks, spatial)]
    chunks = [min(s, b * max(1, round(p * CHUNK_FRACTION_OF_PATCH / b))) for p, b, s in zip(patch, blocks, spatial)]
    return (1, *chunks), (1, *blocks)


def array_file(folder: str | os.PathLike, stem: str) -> Path | None:
    """The stored array ``<stem>.<format>`` in ``folder`` (formats tried in ``ARRAY_FORMATS`` order), or None."""
    for array_format in ARRAY_FORMATS:
        path = Path(folder) / f"{stem}.{array_format}"
        if path.is_file():
            return path
    return None


def _blosc2_cparams(nthreads: int | None) -> Any:
    import blosc2

    return blosc2.CParams(
        codec=getattr(blosc2.Codec, BLOSC2_CODEC),
        clevel=BLOSC2_CLEVEL,
        filters=[getattr(blosc2.Filter, BLOSC2_FILTER)],
        nthreads=nthreads or blosc2.nthreads,
    )


def _open_b2nd(path: Path, mmap: bool, nthreads: int) -> Any:
    """A blosc2 NDArray, lazily read. ``deserialize="safe"`` and the type check refuse the containers that
    blosc2 would rebuild from stored recipes or Python objects: a store holds plain arrays only."""
    import blosc2

    # memory mapping is not available for blosc2 files on Windows
    extra = {"mmap_mode": "r"} if mmap and os.name != "nt" else {}
    array = blosc2.open(str(path), mode="r", deserialize="safe", dparams=blosc2.DParams(nthreads=nthreads), **extra)
    if type(array) is not blosc2.NDArray:
        raise ValueError(f"holds a {type(array).__name__}, not a plain blosc2 NDArray")
    return array


def open_array(path: str | os.PathLike, mmap: bool = True, nthreads: int = 1) -> StoredArray:
    """A stored array by its file: ``.npy`` memory-mapped read-only (``mmap``) or loaded; ``.b2nd`` as a lazy
    blosc2 NDArray (``mmap``, sliced like numpy: ``array[:, z0:z1, y0:y1, x0:x1]`` returns numpy) or fully
    decompressed into numpy. ``nthreads``: blosc2 decompression threads; 1 suits patch reads, which are
    small and usually run in several loader processes at once."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if path.suffix == ".b2nd":
        array = _open_b2nd(path, mmap, nthreads)
        return array if mmap else array[()]
    raise ValueError(f"{path}: unknown array format (expected one of {', '.join(ARRAY_FORMATS)})")


def save_array(
    folder: str | os.PathLike,
    stem: str,
    array: np.ndarray,
    array_format: str = DEFAULT_ARRAY_FORMAT,
    patch_size: Sequence[int] | None = None,
    nthreads: int | None = None,
) -> Path:
    """Write ``array`` (4D ``[C, Z, Y, X]``) as ``folder/<stem>.<array_format>`` atomically and return the path.

    The file is written under a temporary name in the same folder, reopened and checked (shape, dtype) and
    only then renamed. A copy of the stem in the other format is removed, so a store never holds two
    disagreeing versions of an array. ``patch_size`` shapes the b2nd chunks (:func:`blosc2_chunking`;
    default ``DEFAULT_PATCH_SIZE``); ``nthreads``: blosc2 compression threads (default: blosc2's own, all
    cores; preprocessing workers pass 1 so that N workers use N cores).
    """
    if array_format not in ARRAY_FORMATS:
        raise ValueError(f"unknown array format {array_format!r}; expected one of {ARRAY_FORMATS}")
    array = np.ascontiguousarray(array)
    target = Path(folder) / f"{stem}.{array_format}"
    with atomic_path(target, suffix=f".{array_format}") as tmp:
        if array_format == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        else:
            import blosc2

            chunks, blocks = blosc2_chunking(array.shape, patch_size or DEFAULT_PATCH_SIZE, array.itemsize)
            written = blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks,
                                     cparams=_blosc2_cparams(nthreads))
            del written  # flushes and closes the file before it is reopened below
        check = open_array(tmp, mmap=True)
        if tuple(check.shape) != array.shape or check.dtype != array.dtype:
            raise PreprocessingError(
                f"{target}: written array reads back as {check.dtype} {tuple(check.shape)}, expected "
                f"{array.dtype} {array.shape}; check free disk space and re-run `autoseg preprocess`"
            )
        del check
    for other in ARRAY_FORMATS:
        if other != array_format:
            (Path(folder) / f"{stem}.{other}").unlink(missing_ok=True)
    return target


def save_case(
    folder: str | os.PathLike,
    data: np.ndarray,
    label: np.ndarray | None,
    properties: CaseProperties,
    patch_size: Sequence[int] | None = None,
    array_format: str = DEFAULT_ARRAY_FORMAT,
    nthreads: int | None = None,
) -> None:
    """Store one case atomically: arrays first, properties JSON last (its presence marks completion).

    ``patch_size``: the configuration's patch (``[Z, Y, X]``, 2D ``[Y, X]``) that shapes the b2nd chunks;
    ``array_format``: ``"b2nd"`` (default) or ``"npy"``; ``nthreads``: blosc2 compression threads."""
    folder = Path(folder)
    if data.ndim != 4:
        raise ValueError(f"stored images are [C, Z, Y, X]; got shape {data.shape}")
    if label is not None and (label.shape[1:] != data.shape[1:] or label.shape[0] != 1):
        raise ValueError(f"label shape {label.shape} does not match image {data.shape}")
    case_id = properties.case_id
    properties_path(folder, case_id).unlink(missing_ok=True)
    save_array(folder, case_id, data.astype(np.float32, copy=False), array_format, patch_size, nthreads)
    if label is not None:
        save_array(folder, f"{case_id}_seg", label.astype(np.int8, copy=False), array_format, patch_size, nthreads)
    else:
        for other in ARRAY_FORMATS:  # an image-only rewrite must not leave an old label behind
            (folder / f"{case_id}_seg.{other}").unlink(missing_ok=True)
    text = properties_text(properties)
    atomic_write(properties_path(folder, case_id), lambda handle: handle.write(text.encode("utf-8")))


def load_properties(folder: str | os.PathLike, case_id: str) -> CaseProperties:
    path = properties_path(Path(folder), case_id)
    if not path.is_file():
        raise PreprocessingError(f"{path}: missing; run `autoseg preprocess` (or `autoseg plan`) for this dataset")
    return CaseProperties.from_json(read_json(path))


def load_case(
    folder: str | os.PathLike, case_id: str, mmap: bool = True
) -> tuple[StoredArray, StoredArray | None, CaseProperties]:
    """``(image [C,Z,Y,X], label [1,Z,Y,X] or None, properties)`` in whichever format is on disk.

    ``mmap`` (default): read lazily, ``.npy`` as a read-only memory map and ``.b2nd`` as a blosc2 NDArray
    (both slice like numpy and give numpy arrays; ``np.asarray`` reads all); else numpy arrays in memory.
    """
    folder = Path(folder)
    properties = load_properties(folder, case_id)
    image_file = array_file(folder, case_id)
    try:
        if image_file is None:
            raise FileNotFoundError(f"no {case_id}.b2nd or {case_id}.npy")
        data = open_array(image_file, mmap=mmap)
        label_file = array_file(folder, f"{case_id}_seg")
        label = open_array(label_file, mmap=mmap) if label_file is not None else None
    except Exception as exc:  # noqa: BLE001 - numpy, blosc2 and the OS each raise their own kinds
        raise PreprocessingError(
            f"{image_file or folder / case_id}: preprocessed arrays are unreadable ({exc}); "
            "re-run `autoseg preprocess`, which redoes incomplete cases"
        ) from exc
    return data, label, properties


# ------------------------------------------------------------------------------------------ provenance
DIGEST_BYTES = 16  # 128-bit blake2b: collisions are not a concern for telling versions of one file apart
_READ_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """blake2b (``DIGEST_BYTES``) of the file's bytes, hex."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """blake2b of ``value``'s canonical JSON (sorted keys, compact), hex."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).hexdigest()


def input_record(input_files: Sequence[str | os.PathLike]) -> list[list[str]]:
    """``[[file name, file_digest], ...]`` of a case's image channel files then its label file, in that order
    (the order is part of the record: swapped channels are another input). Names without folders, so moving
    the data root does not make a store stale."""
    return [[Path(f).name, file_digest(f)] for f in input_files]


def case_provenance(inputs: list[list[str]], plan_digest: str) -> dict[str, Any]:
    """What one stored case is made from: ``{"inputs": inputs, "plan": plan_digest}``, with ``inputs`` from
    :func:`input_record` and ``plan_digest`` a digest of everything in the plan that changes the stored
    arrays (``autoseg.preprocessing.dataset.plan_digest``)."""
    return {"inputs": inputs, "plan": plan_digest}


def is_complete(
    folder: str | os.PathLike, case_id: str, with_label: bool = True, provenance: dict[str, Any] | None = None
) -> bool:
    """True when the case's JSON exists and its arrays load with the recorded shape (a rerun skips it) and,
    when ``provenance`` is given, the case was made from exactly that (else it is stale: redo it)."""
    folder = Path(folder)
    try:
        data, label, properties = load_case(folder, case_id, mmap=True)
    except Exception:  # any unreadable piece means: redo this case
        return False
    if provenance is not None and properties.provenance != provenance:
        return False
    if list(data.shape[1:]) != list(properties.shape_after_resampling):
        return False
    if with_label and (label is None or label.shape[1:] != data.shape[1:]):
        return False
    return True


def list_stored_cases(folder: str | os.PathLike) -> list[str]:
    """Case identifiers with a properties JSON in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))
