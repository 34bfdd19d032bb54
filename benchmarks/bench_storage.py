"""Preprocessed-array storage: disk bytes, write time and random patch reads per second, format by format.

What is measured, on synthetic CT-like cases (``--cases`` of ``--shape`` voxels: a z-scored float32 image
[1, Z, Y, X] with clipped air, body, fat, organs, bone, noise made spatially correlated like resampled data,
and an int8 label [1, Z, Y, X] with ``--classes`` organs):

- disk: bytes of the image file + label file per case (mean over cases);
- write: seconds to write one case's two files (median over cases; the order of the formats rotates from
  case to case so no format always writes into a busier page cache);
- samples/s: reading one sample of image and label at a random position into a preallocated batch slot, as
  ``autoseg.training.data.PatchSampler`` does (one blosc2 thread per reader, like a loader worker). The sample
  is what the sampler reads for the network patch ``--patch``: enlarged so that rotation and scaling find
  no padding (``autoseg.training.augmentation.sample_size_for``; 206^3 for a 128^3 patch);
  ``--reads`` patches per round, the same positions for every format in a round, formats alternating in
  rotating order round after round, median over ``--repeats`` rounds. "warm": files in the page cache (a
  dataset that fits in RAM); "cold": each file is evicted from the page cache before the round
  (``posix_fadvise(DONTNEED)``, this benchmark's own files only), so reads come from the disk.
- for scale, what a loader worker does with each batch besides reading: the median seconds of augmenting
  one batch of 2 such samples with the training transforms (one torch thread, as in a worker), over
  ``--augment-batches`` batches. Reads are a bottleneck only if they take a good part of that.

Formats:

- ``npy``: the old store, uncompressed, memory-mapped.
- ``b2nd ours``: ``autoseg.preprocessing.store.save_array`` exactly as preprocessing writes it (the chunking
  of ``store.blosc2_chunking`` and the codec constants of store.py).
- alternatives of ours, one setting changed each: codec ZSTD level 1, chunks of half the patch, blocks up
  to 64 KiB.
- ``nnU-Net 2.8.1 layout``: blosc2 with the block/chunk rule, codec and filter choice that nnU-Net 2.8.1's
  preprocessing uses, EMULATED here with blosc2 directly (nnU-Net is not a dependency; the rule as
  described in its docstrings, implemented independently in :func:`nnunet_blosc2_layout`): blocks start at
  the next power of two of the patch per axis and the axis with the largest block/target ratio is halved
  until a block is at most 128 KiB (target = min(image, 1.5 x patch)); chunks then grow from the block one
  block step at a time along the least-covered axis up to the target, at most 6 MiB; codec LZ4HC level 5;
  filter NOFILTER or SHUFFLE, whichever compresses a centred one-chunk slab smaller; labels int16;
  written with 4 threads, read with 1. ``--nnunet-venv`` (optional) asks an installed nnU-Net for its
  block/chunk shapes of the first case to check the emulation, and prints both.

Usage (from the repository root)::

    python benchmarks/bench_storage.py                                  # 4 cases of 400x512x512, ~5 min
    python benchmarks/bench_storage.py --shape 160 320 320 --cases 3    # a few minutes on 2 busy cores
    python benchmarks/bench_storage.py --out bench_out/storage.md

Prints a markdown table; ``--out`` also saves it with a JSON of every number beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from autoseg.preprocessing import store  # noqa: E402
from common import machine_description, markdown_table  # noqa: E402

NNUNET_MAX_BLOCK_BYTES = 128 * 1024
NNUNET_MAX_CHUNK_BYTES = 6 * 1024**2
NNUNET_CHUNK_TO_PATCH = 1.5


# ------------------------------------------------------------------------------------------ synthetic data
def synthetic_ct_case(shape: Sequence[int], classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 [1, Z, Y, X], label int8 [1, Z, Y, X])`` looking, to a compressor, like a preprocessed
    CT: HU values of air, fat, soft tissue, ``classes`` ellipsoidal organs and a bone ring, Gaussian noise
    (sd 20 HU), one step of neighbour averaging per axis (the correlation resampling leaves), then CT
    normalisation (clip to [-150, 800] HU, z-score with mean 50 and sd 200): air becomes a constant."""
    rng = np.random.default_rng(seed)
    z_size, y_size, x_size = (int(s) for s in shape)
    yy, xx = np.ogrid[:y_size, :x_size]
    cy, cx = y_size / 2, x_size / 2
    body2d = ((yy - cy) / (0.42 * y_size)) ** 2 + ((xx - cx) / (0.47 * x_size)) ** 2
    image = np.full((z_size, y_size, x_size), -1000.0, dtype=np.float32)
    image[:, body2d < 1.0] = -100.0  # fat
    image[:, body2d < 0.8] = 40.0  # soft tissue
    bone2d = (((yy - 0.7 * y_size) / (0.06 * y_size)) ** 2 + ((xx - cx) / (0.05 * x_size)) ** 2)
    image[:, (bone2d < 1.0) & (bone2d > 0.4)] = 700.0
    label = np.zeros((z_size, y_size, x_size), dtype=np.int8)
    for value in range(1, classes + 1):
        centre = rng.uniform([0.15, 0.3, 0.3], [0.85, 0.7, 0.7]) * (z_size, y_size, x_size)
        radii = rng.uniform(0.04, 0.12, 3) * (z_size, y_size, x_size)
        lo = np.maximum(0, (centre - radii).astype(int))
        hi = np.minimum((z_size, y_size, x_size), (centre + radii).astype(int) + 1)
        grid = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1.0
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        image[region][inside] = rng.uniform(20, 90)
        label[region][inside] = value
    body = image > -1000
    image[body] += rng.standard_normal(int(body.sum()), dtype=np.float32) * 20.0
    for axis in range(3):  # neighbour averaging: the smooth, correlated noise of interpolated data
        moved = np.moveaxis(image, axis, 0)
        moved[:-1] += moved[1:]
        moved[:-1] *= 0.5
    np.clip(image, -150.0, 800.0, out=image)
    image -= 50.0
    image /= 200.0
    return image[None], label[None]


# ------------------------------------------------------------------------------------------ nnU-Net layout
def _ceil_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def nnunet_blosc2_layout(
    shape: Sequence[int], patch_size: Sequence[int], itemsize: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(blocks, chunks)`` of nnU-Net 2.8.1's rule for a ``[C, Z, Y, X]`` array (rule in the module
    docstring; an independent implementation from its description, used only to emulate its files)."""
    spatial = [int(s) for s in shape[1:]]
    patch = [1, *patch_size] if len(patch_size) == 2 else [int(p) for p in patch_size]
    two_d = len(patch_size) == 2
    target = [max(1, min(s, int(math.floor(NNUNET_CHUNK_TO_PATCH * p)))) for s, p in zip(spatial, patch)]
    blocks = [min(_ceil_power_of_two(p), s) for p, s in zip(patch, spatial)]
    while math.prod(blocks) * itemsize > NNUNET_MAX_BLOCK_BYTES:
        axis = max((a for a in range(3) if blocks[a] > 1), key=lambda a: (blocks[a] / target[a], a))
        blocks[axis] = max(1, 1 << ((blocks[axis] - 1).bit_length() - 1))  # the power of two below
    chunks = list(blocks)
    while True:
        options = []
        for axis in range(3):
            if (two_d and axis == 0) or patch[axis] == 1 or chunks[axis] >= min(spatial[axis], target[axis]):
                continue
            grown = list(chunks)
            grown[axis] = min(chunks[axis] + blocks[axis], spatial[axis], target[axis])
            if math.prod(grown) * itemsize > NNUNET_MAX_CHUNK_BYTES:
                continue
            options.append(((chunks[axis] / target[axis], -spatial[axis], axis), grown))
        if not options:
            break
        chunks = min(options)[1]
    return (1, *blocks), (1, *chunks)


def _nnunet_filter(array: np.ndarray, blocks: tuple[int, ...], chunks: tuple[int, ...]):
    """NOFILTER or SHUFFLE, whichever compresses the centred one-chunk slab of ``array`` smaller."""
    import blosc2

    slab_shape = [min(c, s) for c, s in zip(chunks, array.shape)]
    slab = np.ascontiguousarray(array[tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(array.shape, slab_shape))])
    trial_blocks = tuple(max(1, min(b, c)) for b, c in zip(blocks, slab_shape))
    sizes = {}
    for choice in (blosc2.Filter.NOFILTER, blosc2.Filter.SHUFFLE):
        cparams = blosc2.CParams(codec=blosc2.Codec.LZ4HC, clevel=5, filters=[choice], nthreads=4)
        sizes[choice] = blosc2.asarray(slab, chunks=tuple(slab_shape), blocks=trial_blocks, cparams=cparams).schunk.cbytes
    return blosc2.Filter.SHUFFLE if sizes[blosc2.Filter.SHUFFLE] < sizes[blosc2.Filter.NOFILTER] else blosc2.Filter.NOFILTER


def nnunet_layout_from_venv(venv: Path, shape: Sequence[int], patch: Sequence[int], itemsize: int) -> list | None:
    """nnU-Net's own ``comp_blosc2_params`` answer from an installed nnU-Net (None when it cannot run)."""
    code = ("import json, sys; from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params as f; "
            "a = json.loads(sys.argv[1]); print(json.dumps(f(a[0], a[1], a[2])))")
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code, json.dumps([list(shape), list(patch), itemsize])],
                             capture_output=True, text=True, timeout=300, check=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------ formats
@dataclass
class Format:
    name: str
    suffix: str
    write: Callable[[Path, str, np.ndarray, np.ndarray], None]  # (folder, case, image, label)


def _write_b2nd(path: Path, array: np.ndarray, chunks, blocks, cparams) -> None:
    import blosc2

    blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), mode="w", chunks=chunks, blocks=blocks,
                   cparams=cparams)


def build_formats(patch: Sequence[int]) -> list[Format]:
    import blosc2

    def ours(folder, case, image, label):
        store.save_array(folder, case, image, "b2nd", patch)
        store.save_array(folder, f"{case}_seg", label, "b2nd", patch)

    def npy(folder, case, image, label):
        store.save_array(folder, case, image, "npy")
        store.save_array(folder, f"{case}_seg", label, "npy")

    def variant(codec, clevel, chunk_fraction, block_bytes=None):
        """Our rule with one thing changed: codec, chunk fraction of the patch, or block size cap."""
        def write(folder, case, image, label):
            cparams = blosc2.CParams(codec=codec, clevel=clevel, filters=[blosc2.Filter.SHUFFLE])
            for stem, array in ((case, image), (f"{case}_seg", label)):
                chunks, blocks = store.blosc2_chunking(array.shape, patch, array.itemsize)
                if block_bytes is not None:
                    blocks = [1, *[b * 2 for b in blocks[1:]]]
                    while math.prod(blocks) * array.itemsize > block_bytes:
                        axis = max(range(1, 4), key=lambda a: (blocks[a], -a))
                        blocks[axis] //= 2
                    blocks = tuple(min(b, s) for b, s in zip(blocks, array.shape))
                if chunk_fraction != store.CHUNK_FRACTION_OF_PATCH or block_bytes is not None:
                    chunks = (1, *[min(s, b * max(1, round(p * chunk_fraction / b)))
                                   for p, b, s in zip(patch, blocks[1:], array.shape[1:])])
                _write_b2nd(folder / f"{stem}.b2nd", array, chunks, blocks, cparams)
        return write

    def nnunet(folder, case, image, label):
        for stem, array in ((case, image), (f"{case}_seg", label.astype(np.int16))):
            blocks, chunks = nnunet_blosc2_layout(array.shape, patch, array.itemsize)
            cparams = blosc2.CParams(codec=blosc2.Codec.LZ4HC, clevel=5, nthreads=4,
                                     filters=[_nnunet_filter(array, blocks, chunks)])
            _write_b2nd(folder / f"{stem}.b2nd", array, chunks, blocks, cparams)

    fraction, block_kib = store.CHUNK_FRACTION_OF_PATCH, store.MAX_BLOCK_BYTES // 1024
    return [
        Format("npy", "npy", npy),
        Format(f"b2nd ours ({store.BLOSC2_CODEC}-{store.BLOSC2_CLEVEL}, chunks {fraction:g} patch, blocks "
               f"{block_kib} KiB)", "b2nd", ours),
        Format("b2nd, ours but ZSTD-1", "b2nd", variant(blosc2.Codec.ZSTD, 1, fraction)),
        Format("b2nd, ours but chunks 0.5 patch", "b2nd", variant(blosc2.Codec.LZ4, 5, 0.5)),
        Format("b2nd, ours but blocks 64 KiB", "b2nd", variant(blosc2.Codec.LZ4, 5, fraction, 64 * 1024)),
        Format("nnU-Net 2.8.1 layout (emulated)", "b2nd", nnunet),
    ]


# ------------------------------------------------------------------------------------------ measuring
def _evict(paths: Sequence[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_round(folder: Path, suffix: str, cases: Sequence[str], positions, patch: Sequence[int]) -> float:
    """Seconds to read ``len(positions)`` patches ``(case index, start)`` of image + label (arrays opened
    once per round, as a loader worker keeps them open)."""
    opened = {c: (store.open_array(folder / f"{c}.{suffix}", nthreads=1),
                  store.open_array(folder / f"{c}_seg.{suffix}", nthreads=1)) for c in cases}
    image_out = np.zeros((1, *patch), dtype=np.float32)
    label_out = np.zeros((1, *patch), dtype=np.float32)
    start_time = time.perf_counter()
    for case_index, start in positions:
        image, label = opened[cases[case_index]]
        region = (slice(None), *[slice(s, s + p) for s, p in zip(start, patch)])
        image_out[...] = image[region]
        label_out[...] = label[region]
    return time.perf_counter() - start_time


def time_augmentation(patch: Sequence[int], sample: Sequence[int], batches: int) -> float:
    """Median seconds to augment one batch of 2 samples (``[2, 1, *sample]`` image and label, random
    content) with the training transforms of ``patch``, one torch thread, fixed seeds."""
    import random

    import torch

    from autoseg.training.augmentation import augmentation_settings, training_transforms

    torch.set_num_threads(1)
    np.random.seed(0)
    random.seed(0)
    transforms = training_transforms(tuple(patch), augmentation_settings(tuple(patch)),
                                     [(1.0,) * len(patch), (0.5,) * len(patch)])
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 1, *sample)).astype(np.float32)
    label = rng.integers(0, 3, (2, 1, *sample)).astype(np.float32)
    seconds = []
    for _ in range(batches):
        start = time.perf_counter()
        transforms(data=image.copy(), seg=label.copy())
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512], help="Z Y X of each case")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--classes", type=int, default=20, help="label classes per case")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128],
                        help="network patch, Z Y X: shapes the chunks; reads are of its enlarged sample")
    parser.add_argument("--reads", type=int, default=10, help="samples read per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per format (median)")
    parser.add_argument("--augment-batches", type=int, default=10, help="augmented batches timed (0: skip)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="check the emulated layout against nnU-Net")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (+ .json beside it)")
    args = parser.parse_args(argv)
    from autoseg.training.augmentation import augmentation_settings, sample_size_for

    shape, patch = tuple(args.shape), tuple(args.patch)
    sample = tuple(min(p, s) for p, s in zip(sample_size_for(patch, augmentation_settings(patch)), shape))

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_storage_"))
    formats = build_formats(patch)
    folders = {f.name: work / f"format_{i}" for i, f in enumerate(formats)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    cases = [f"case_{i:03d}" for i in range(args.cases)]
    writes: dict[str, list[float]] = {f.name: [] for f in formats}
    began = time.perf_counter()
    check = None
    for index, case in enumerate(cases):
        image, label = synthetic_ct_case(shape, args.classes, seed=index)
        if index == 0 and args.nnunet_venv is not None:
            check = {"theirs": nnunet_layout_from_venv(args.nnunet_venv, image.shape, patch, 4),
                     "emulated": nnunet_blosc2_layout(image.shape, patch, 4)}
        for k in range(len(formats)):
            fmt = formats[(index + k) % len(formats)]
            t = time.perf_counter()
            fmt.write(folders[fmt.name], case, image, label)
            writes[fmt.name].append(time.perf_counter() - t)
        del image, label
        print(f"[{time.perf_counter() - began:.0f} s] wrote {case} in every format", file=sys.stderr)

    rng = np.random.default_rng(0)
    reads = {mode: {f.name: [] for f in formats} for mode in ("warm", "cold")}
    for mode in ("warm", "cold"):
        for round_index in range(args.repeats):
            positions = [(int(rng.integers(len(cases))), [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, sample)])
                         for _ in range(args.reads)]
            for k in range(len(formats)):
                fmt = formats[(round_index + k) % len(formats)]
                if mode == "cold":
                    _evict(sorted(folders[fmt.name].glob(f"*.{fmt.suffix}")))
                seconds = read_round(folders[fmt.name], fmt.suffix, cases, positions, sample)
                reads[mode][fmt.name].append(args.reads / seconds)
        print(f"[{time.perf_counter() - began:.0f} s] {mode} reads done", file=sys.stderr)

    augment_seconds = time_augmentation(patch, sample, args.augment_batches) if args.augment_batches else None
    disk = {f.name: statistics.mean(
        sum(p.stat().st_size for p in folders[f.name].glob(f"{c}*.{f.suffix}")) for c in cases) for f in formats}
    nnunet_name = formats[-1].name
    rows, record = [], []
    for fmt in formats:
        name = fmt.name
        warm, cold = statistics.median(reads["warm"][name]), statistics.median(reads["cold"][name])
        row = {
            "format": name, "disk_mb_per_case": disk[name] / 1e6, "write_s_per_case": statistics.median(writes[name]),
            "warm_patches_per_s": warm, "cold_patches_per_s": cold,
            "disk_vs_npy": disk[name] / disk["npy"], "disk_vs_nnunet": disk[name] / disk[nnunet_name],
            "warm_vs_npy": warm / statistics.median(reads["warm"]["npy"]),
            "warm_vs_nnunet": warm / statistics.median(reads["warm"][nnunet_name]),
            "cold_vs_nnunet": cold / statistics.median(reads["cold"][nnunet_name]),
        }
        record.append(row)
        rows.append([name, f"{row['disk_mb_per_case']:.0f}", f"{row['disk_vs_npy']:.2f}", f"{row['disk_vs_nnunet']:.2f}",
                     f"{row['write_s_per_case']:.2f}", f"{warm:.1f}", f"{row['warm_vs_npy']:.2f}",
                     f"{row['warm_vs_nnunet']:.2f}", f"{cold:.1f}", f"{row['cold_vs_nnunet']:.2f}"])
    table = markdown_table(
        ["format", "disk MB/case", "disk vs npy", "disk vs nnU-Net", "write s/case", "warm samples/s",
         "warm vs npy", "warm vs nnU-Net", "cold samples/s", "cold vs nnU-Net"], rows)
    chunks, blocks = store.blosc2_chunking((1, *shape), patch, 4)
    nn_blocks, nn_chunks = nnunet_blosc2_layout((1, *shape), patch, 4)
    caption = (f"{args.cases} synthetic CT-like cases of {shape[0]}x{shape[1]}x{shape[2]} (float32 image + int8 "
               f"label, {args.classes} classes; nnU-Net's layout stores the label as int16 as it does), network "
               f"patch {'x'.join(map(str, patch))} (chunking), reads of its enlarged sample "
               f"{'x'.join(map(str, sample))} image + label, {args.reads} per round, median of {args.repeats} "
               f"rounds, formats alternating. Image chunks/blocks: ours {chunks[1:]}/{blocks[1:]}, nnU-Net "
               f"{nn_chunks[1:]}/{nn_blocks[1:]}. Writes of npy and ours go through store.save_array (fsync, "
               f"reopen check, rename), the others are plain blosc2 writes. Total {time.perf_counter() - began:.0f} s.")
    if augment_seconds is not None:
        caption += (f" For scale: augmenting one batch of 2 samples of {'x'.join(map(str, sample))} took "
                    f"{augment_seconds:.2f} s (median of {args.augment_batches} batches, 1 torch thread).")
    if check is not None:
        caption += f" nnU-Net's own comp_blosc2_params (blocks, chunks): {check['theirs']}; emulated: {check['emulated']}."
    text = caption + "\n\n" + table + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"rows": record, "writes": writes, "reads": reads, "shape": shape, "patch": patch, "sample": sample,
             "cases": args.cases, "augment_seconds_per_batch_of_2": augment_seconds,
             "machine": machine_description(), "nnunet_check": check}, indent=2, default=str) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
