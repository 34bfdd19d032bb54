"""Batches for the training loop: sampler + augmentation, in worker processes or in-process.

``num_workers > 0`` uses a torch ``DataLoader`` over an endless iterable: each worker samples and augments
whole batches, blocking on a queue (no busy waiting), memory pinned when training on CUDA so the copy to the
GPU overlaps compute. ``num_workers = 0`` runs everything in the calling process, deterministically from
the numpy generator passed to :meth:`BatchLoader.reseed` (used by tests and by bit-exact resume).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autoseg.training.data import PatchSampler

log = logging.getLogger(__name__)


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": torch.from_numpy(np.ascontiguousarray(batch["data"])),
        "target": [torch.from_numpy(np.ascontiguousarray(t)) for t in batch["target"]],
        "keys": list(batch.get("keys", [])),
    }


def make_batch(sampler: PatchSampler, transforms: Any, rng: np.random.Generator, batch_size: int | None = None) -> dict:
    """One augmented batch as torch tensors: ``data [B, C, *P]`` float32, ``target`` list of ``[B, 1, *P_i]``."""
    return _to_torch(transforms(**sampler.sample_batch(rng, batch_size)))


class _EndlessBatches(IterableDataset):
    def __init__(self, sampler: PatchSampler, transforms: Any, seed: int, batch_size: int | None) -> None:
        self.sampler, self.transforms, self.seed, self.batch_size = sampler, transforms, seed, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker])
        while True:
            yield make_batch(self.sampler, self.transforms, rng, self.batch_size)


def _init_worker(worker_id: int) -> None:
    # batchgenerators draws from numpy's global generator: give each worker its own stream; one torch
    # thread per worker so workers do not fight the training process for cores
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


class BatchLoader:
    """Endless iterator of batches. ``next(loader)`` -> ``{"data", "target", "keys"}``."""

    def __init__(
        self,
        sampler: PatchSampler,
        transforms: Any,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.sampler = sampler
        self.transforms = transforms
        self.num_workers = int(num_workers)
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._iterator: Iterator[dict] | None = None
        if self.num_workers > 0:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
            self._loader = DataLoader(
                _EndlessBatches(sampler, transforms, seed, batch_size),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=pin_memory,
                persistent_workers=True,
                prefetch_factor=2,
                worker_init_fn=_init_worker,
                generator=generator,
            )

    def reseed(self, rng: np.random.Generator) -> None:
        """In-process mode: draw the next batches from ``rng`` (workers keep their own streams)."""
        self._rng = rng

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict:
        if self.num_workers == 0:
            return make_batch(self.sampler, self.transforms, self._rng, self.batch_size)
        if self._iterator is None:
            self._iterator = iter(self._loader)
        return next(self._iterator)

    def close(self) -> None:
        """Stop the worker processes."""
        self._iterator = None
        if self.num_workers > 0:
            self._loader = None  # type: ignore[assignment]
