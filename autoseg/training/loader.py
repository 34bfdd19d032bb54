"""Batches for the training loop: sampler + augmentation, in worker processes or in-process.

Every batch is a pure function of (base seed, iteration): the sampler draws from a numpy Generator and the
augmentation (batchgenerators draws from numpy's and Python's global generators) from global states seeded
from ``SeedSequence([*base, iteration])``. So the batch of iteration k is the same with 0, 2 or 8 workers and
after any resume, which starts the loader at the iteration it stopped at. Seeding costs a few microseconds per
batch (a Generator and an MT19937 seeded from a SeedSequence); a batch takes milliseconds to seconds.

``num_workers > 0`` uses a torch ``DataLoader`` over an endless iterable: worker w of W makes the batches of
iterations start + w, start + w + W, ..., and the DataLoader returns workers' batches round-robin, i.e. in
iteration order. Workers block on a queue (no busy waiting); memory is pinned when training on CUDA so the
copy to the GPU overlaps compute. ``num_workers = 0`` makes the same batches in the calling process.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autoseg.training.data import PatchSampler
from autoseg.workers import die_with_parent

log = logging.getLogger(__name__)


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": torch.from_numpy(np.ascontiguousarray(batch["data"])),
        "target": [torch.from_numpy(np.ascontiguousarray(t)) for t in batch["target"]],
        "keys": list(batch.get("keys", [])),
    }


def make_batch(sampler: PatchSampler, transforms: Any, rng: np.random.Generator, batch_size: int | None = None) -> dict:
    """One augmented batch as torch tensors: ``data [B, C, *P]`` float32, ``target`` list of ``[B, 1, *P_i]``.
    The augmentation draws from numpy's global generator as it is (see :func:`batch_for_iteration`)."""
    return _to_torch(transforms(**sampler.sample_batch(rng, batch_size)))


def _as_entropy(seed: int | Sequence[int]) -> list[int]:
    return [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


def batch_for_iteration(sampler: PatchSampler, transforms: Any, seed: int | Sequence[int], iteration: int,
                        batch_size: int | None = None) -> dict:
    """The batch of training iteration ``iteration`` (counted over the whole run) of the run seeded ``seed``
    (an int, or ints such as (seed, rank)): the same in any process, whatever happened before."""
    sampling, augmenting = np.random.SeedSequence([*_as_entropy(seed), int(iteration)]).spawn(2)
    state = augmenting.generate_state(4)
    np.random.seed(state)
    random.seed(int(state[0]))
    return make_batch(sampler, transforms, np.random.default_rng(sampling), batch_size)


class _EndlessBatches(IterableDataset):
    def __init__(self, sampler: PatchSampler, transforms: Any, seed: list[int], start: int,
                 batch_size: int | None) -> None:
        self.sampler, self.transforms, self.seed, self.start = sampler, transforms, seed, start
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        iteration = self.start + worker
        while True:
            yield batch_for_iteration(self.sampler, self.transforms, self.seed, iteration, self.batch_size)
            iteration += workers


def _init_worker(worker_id: int) -> None:
    # one torch thread per worker so workers do not fight the training process for cores
    torch.set_num_threads(1)
    # a kill -9 of the trainer must not leave its loader workers running until torch's watchdog notices
    die_with_parent(os.getppid())


class BatchLoader:
    """Endless iterator of batches. The n-th ``next(loader)`` (from 0) returns the batch of iteration
    ``start_iteration + n``: ``{"data", "target", "keys"}``."""

    def __init__(
        self,
        sampler: PatchSampler,
        transforms: Any,
        num_workers: int = 0,
        seed: int | Sequence[int] = 0,
        pin_memory: bool = False,
        batch_size: int | None = None,
        start_iteration: int = 0,
    ) -> None:
        self.sampler = sampler
        self.transforms = transforms
        self.num_workers = int(num_workers)
        self.batch_size = batch_size
        self.seed = _as_entropy(seed)
        self.next_iteration = int(start_iteration)
        self._iterator: Iterator[dict] | None = None
        if self.num_workers > 0:
            self._loader = DataLoader(
                _EndlessBatches(sampler, transforms, self.seed, self.next_iteration, batch_size),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=pin_memory,
                persistent_workers=True,
                prefetch_factor=2,
                worker_init_fn=_init_worker,
                # its own generator: starting the workers must not draw from the training process's torch RNG
                # (the training step's stream), or a resumed run would differ from an uninterrupted one
                generator=torch.Generator().manual_seed(0),
            )

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict:
        if self.num_workers == 0:
            batch = batch_for_iteration(self.sampler, self.transforms, self.seed, self.next_iteration,
                                        self.batch_size)
        else:
            if self._iterator is None:
                self._iterator = iter(self._loader)
            batch = next(self._iterator)
        self.next_iteration += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes."""
        self._iterator = None
        if self.num_workers > 0:
            self._loader = None  # type: ignore[assignment]
