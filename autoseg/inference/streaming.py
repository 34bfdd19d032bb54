"""Fold-averaged log-probabilities on the network grid with bounded memory: streamed rows, spilled to disk
when the result itself is too big for RAM.

The result ``[K, Z, Y, X]`` (float16: 2 bytes per class and voxel) is the one array of a prediction that grows
with image size times classes: 15.7 GB for 50 classes on a 512 x 512 x 600 CT. It is filled row block by row
block from :func:`~autoseg.inference.sliding_window.iter_log_softmax_rows`, one fold after the other, into
a torch tensor when it fits :data:`RESULT_RAM_BYTES`, else into a :class:`SpilledArray` (a temporary file
read back row by row by the restore). Folds are combined as they arrive, ``log(mean_f p_f) =
logsumexp_f(log p_f) - log F``, in the arithmetic of the whole-volume code (float32, rounded to the result
dtype after each fold), so the numbers are the same; peak memory is one fold's band buffer plus a few row
blocks, whatever the volume.
"""
from __future__ import annotations

import math
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from autoseg.inference.sliding_window import iter_log_softmax_rows

# the largest result kept in RAM by one prediction; a 50-class CT of any size spills instead of needing 15.7 GB
RESULT_RAM_BYTES = 2 << 30
# all results autoseg predict holds in RAM at once (up to 2 * -np + 1 of them: the network's, the writers'
# queue): it lowers each result's limit to its share, so with the band buffer and the restore slabs a run
# stays within the 8 GB a 24 GB workstation can give one stage (-np 2: 5 results of at most 0.8 GiB each)
RESULTS_RAM_BYTES = 4 << 30


def _close_and_remove(handle: Any, path: str | None) -> None:
    handle.close()
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class SpilledArray:
    """A ``[K, Z, Y, X]`` array (C order) in a temporary file instead of RAM, written and read by rows.

    Read with ``array[k, z]``, ``array[:, z0:z1]`` and the like (first two axes: an index or a slice of step 1;
    further axes: anything numpy takes); each read loads only the rows asked for, with plain file reads, so
    neither RAM nor the process's resident pages (as a memory map would) ever hold the whole array. Turning
    the whole array into a numpy array raises instead of silently loading it.

    The file is ``.autoseg-*.partial`` in ``directory`` (None: the system temporary folder). Where the system
    allows it (POSIX) its name is removed at once, so nothing is left behind even when the process is killed;
    the disk space returns when :meth:`close` runs or the array is garbage-collected. Elsewhere the file is
    deleted then.
    """

    def __init__(self, shape: Sequence[int], dtype: np.dtype | type, directory: str | os.PathLike | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 4:
            raise ValueError(f"SpilledArray holds [K, Z, Y, X], got shape {self.shape}")
        self.dtype = np.dtype(dtype)
        self.ndim = 4
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._row_bytes = int(np.prod(self.shape[2:])) * self.dtype.itemsize
        descriptor, path = tempfile.mkstemp(prefix=".autoseg-", suffix=".partial", dir=directory)
        self._file = os.fdopen(descriptor, "w+b")
        try:
            self._file.truncate(self.nbytes)  # sparse where the file system allows; every byte is written later
            os.unlink(path)
            remaining: str | None = None
        except PermissionError:  # Windows cannot remove an open file: delete it when closed
            remaining = path
        except BaseException:
            _close_and_remove(self._file, path)
            raise
        self.path = remaining
        self._lock = threading.Lock()  # reads and writes seek first: one at a time
        self._finalizer = weakref.finalize(self, _close_and_remove, self._file, remaining)

    def close(self) -> None:
        """Release the file (and its disk space) now; the array cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> "SpilledArray":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise TypeError(
            f"SpilledArray {self.shape} is {self.nbytes / 2**30:.1f} GiB on disk because it does not fit in RAM; "
            "read it by rows (array[:, z0:z1]) instead of converting the whole of it"
        )

    def _offset(self, channel: int, row: int) -> int:
        return (channel * self.shape[1] + row) * self._row_bytes

    def write_rows(self, start: int, block: np.ndarray) -> None:
        """``array[:, start:start + rows] = block`` for ``block`` ``[K, rows, Y, X]`` (converted to the dtype)."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[0] != self.shape[0] or block.shape[2:] != self.shape[2:] or start + block.shape[1] > self.shape[1]:
            raise ValueError(f"rows {start}:{start + block.shape[1]} of shape {block.shape} do not fit {self.shape}")
        with self._lock:
            for channel in range(self.shape[0]):
                self._file.seek(self._offset(channel, start))
                self._file.write(memoryview(block[channel]).cast("B"))

    def read_rows(self, start: int, stop: int, channels: range | None = None) -> np.ndarray:
        """``array[channels, start:stop]`` as a new ``[len(channels), stop - start, Y, X]`` numpy array."""
        channels = range(self.shape[0]) if channels is None else channels
        out = np.empty((len(channels), stop - start, *self.shape[2:]), dtype=self.dtype)
        if out.size == 0:
            return out
        with self._lock:
            for index, channel in enumerate(channels):
                self._file.seek(self._offset(channel, start))
                if self._file.readinto(memoryview(out[index]).cast("B")) != out[index].nbytes:
                    raise OSError(f"spilled prediction file ended early (reading rows {start}:{stop})")
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(part is Ellipsis for part in key):
            raise TypeError("SpilledArray takes explicit indices for the first two axes, not ...")
        key = key + (slice(None),) * (2 - len(key))
        picks = []
        for part, length in zip(key[:2], self.shape[:2]):
            if isinstance(part, (int, np.integer)):
                index = int(part) + length if part < 0 else int(part)
                if not 0 <= index < length:
                    raise IndexError(f"index {part} out of range for an axis of length {length}")
                picks.append((range(index, index + 1), 0))
            elif isinstance(part, slice) and part.step in (None, 1):
                picks.append((range(*part.indices(length)), slice(None)))
            else:
                raise TypeError(f"SpilledArray reads an index or a slice of step 1 on the first two axes, got {part!r}")
        (channels, channel_pick), (rows, row_pick) = picks
        values = self.read_rows(rows.start, max(rows.start, rows.stop), channels)
        return values[(channel_pick, row_pick, *key[2:])]


def _read_rows(result: torch.Tensor | SpilledArray, start: int, stop: int) -> torch.Tensor:
    if isinstance(result, SpilledArray):
        return torch.from_numpy(result.read_rows(start, stop))
    return result[:, start:stop]


def _write_rows(result: torch.Tensor | SpilledArray, start: int, block: torch.Tensor) -> None:
    if isinstance(result, SpilledArray):
        result.write_rows(start, block.cpu().numpy())
    else:
        result[:, start:start + block.shape[1]].copy_(block)


def stream_log_probabilities(
    networks: Sequence[nn.Module],
    data: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    dims: int,
    num_classes: int,
    *,
    step_size: float = 0.5,
    mirror: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    amp: torch.dtype | None = None,
    accumulator_dtype: torch.dtype = torch.float16,
    ram_bytes: int = RESULT_RAM_BYTES,
    spill_directory: str | os.PathLike | None = None,
) -> torch.Tensor | SpilledArray:
    """Log of the fold-averaged softmax ``[K, Z, Y, X]`` of ``accumulator_dtype`` for preprocessed ``data``
    ``[C, Z, Y, X]``: a CPU tensor when ``K x voxels x itemsize <= ram_bytes``, else a :class:`SpilledArray`
    in ``spill_directory`` (released on error).

    The same values as running :func:`~autoseg.inference.sliding_window.sliding_window_predict` with
    ``log_softmax=True`` per fold and combining ``total = logaddexp(total, fold)`` then ``total - log F``
    (float32 arithmetic, rounded to ``accumulator_dtype`` after each step), block by block: the folds run one
    after the other, each fold's rows are combined with the result's rows as they arrive (on the device the
    fold accumulates on). Memory: one fold's band buffer (:func:`iter_log_softmax_rows`) and a few row blocks
    besides the result. The networks must be on ``device`` and in eval mode; call under
    ``torch.inference_mode()``.
    """
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    shape = (int(num_classes), *(int(n) for n in data.shape[1:]))
    itemsize = torch.empty((), dtype=accumulator_dtype).element_size()
    result: torch.Tensor | SpilledArray
    if int(np.prod(shape)) * itemsize <= ram_bytes:
        result = torch.empty(shape, dtype=accumulator_dtype)
    else:
        result = SpilledArray(shape, torch.empty((), dtype=accumulator_dtype).numpy().dtype,
                              Path(spill_directory) if spill_directory is not None else None)
    shift = math.log(len(networks))
    try:
        for index, network in enumerate(networks):
            combine, last = index > 0, index == len(networks) - 1 and len(networks) > 1
            for start, stop, block in iter_log_softmax_rows(
                network, data, patch_size, dims, num_classes, step_size=step_size, mirror=mirror, device=device,
                batch_size=batch_size, amp=amp, accumulator_dtype=accumulator_dtype,
            ):
                if combine:
                    previous = _read_rows(result, start, stop).to(block.device)
                    block = torch.logaddexp(previous.float(), block.float()).to(accumulator_dtype)
                if last:
                    block = (block.float() - shift).to(accumulator_dtype)
                _write_rows(result, start, block)
    except BaseException:
        if isinstance(result, SpilledArray):
            result.close()
        raise
    return result
