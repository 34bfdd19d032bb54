"""``--time-budget``: what a small budget should buy, and the clock that ends training within it.

Two halves. :func:`adapt_to_budget` adapts the plan's network to the budget (issue 11 item 4): pure functions
over :class:`~autoseg.contracts.plans.Configuration`; the trainer applies
:func:`adapt_to_budget` once at start, stores the adapted configuration in the checkpoint metadata (inference
builds its network from there) and logs the reasons. :class:`BudgetClock` is the policy that ends training in
time (reserve for the final validation, validation owed by the current epoch, one more step or not), behind
one object the training loop asks. Nothing here switches on an architecture name: the
width of any network is its ``features`` list, scaled as a whole.

Evidence for the choices (per-iteration times, short budget-limited trainings on MSD Hippocampus and the
demo dataset): ``benchmarks/results/budget_study.md``, produced by ``benchmarks/budget_study.py``.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from autoseg.contracts.plans import Configuration
from autoseg.device import cpu_supports_bf16
from autoseg.training.schedule import training_progress

MIN_FEATURES = 4  # narrower stages than this stop being a network (InstanceNorm over 1-3 channels)


def scale_features(features: Sequence[int], factor: float, minimum: int = MIN_FEATURES) -> list[int]:
    """Every stage's width times ``factor`` (so the cap scales too: 32..320 x 0.5 -> 16..160), rounded,
    at least ``minimum``. ``[32, 64, 128, 256] x 0.5 -> [16, 32, 64, 128]``."""
    if factor <= 0:
        raise ValueError(f"width factor must be positive, got {factor}")
    return [max(minimum, int(round(f * factor))) for f in features]


def with_width(configuration: Configuration, factor: float) -> Configuration:
    """A copy of ``configuration`` whose network features are scaled by ``factor`` (all else unchanged)."""
    config = copy.deepcopy(configuration)
    config.architecture = replace(config.architecture,
                                  features=scale_features(config.architecture.features, factor))
    return config


def with_stages(configuration: Configuration, stages: int) -> Configuration:
    """A copy with only the first ``stages`` resolution stages (depth); the patch stays divisible because
    the kept strides are a prefix of the planned ones."""
    config = copy.deepcopy(configuration)
    arch = config.architecture
    stages = max(2, min(stages, len(arch.features)))
    config.architecture = replace(arch, features=list(arch.features[:stages]),
                                  strides=[list(s) for s in arch.strides[:stages]],
                                  kernel_sizes=[list(k) for k in arch.kernel_sizes[:stages]])
    return config


# ------------------------------------------------------------------------------------------- threads
def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def training_threads(num_workers: int, cores: int | None = None) -> int:
    """torch intra-op threads for the training process on CPU: one per physical core (hyper-threads only
    add contention), minus the cores the augmentation workers keep busy (each runs one torch thread,
    :func:`autoseg.training.loader._init_worker`), keeping at least one core for the network.

    Evidence (benchmarks/results/budget_study.md): 2 cores, 2 workers, demo plan, 30 iterations: 1 thread
    28.6 s vs 2 threads 60.8 s (median of 2, alternating); OpenMP threads spinning against busy workers
    (and other tenants) cost more than the second core gives."""
    cores = physical_cores() if cores is None else max(1, cores)
    return max(1, cores - min(max(0, num_workers), cores - 1))


# --------------------------------------------------------------------------------------------- policy
# Evidence: benchmarks/results/budget_study.md. On a 2-core CPU the plan's network (features 32..256/320)
# gets a few hundred iterations in 20 minutes, too few for a 3D U-Net to leave Dice 0 on small structures;
# a narrower network (features x 1/2, caps scaled alike) trains ~3x more iterations per second,
# bf16 autocast (avx512_bf16 / AMX via oneDNN) another ~1.4-1.8x, and batch 2 instead of a larger planned
# batch (MSD Hippocampus: 7) ~3x. channels_last_3d was slower on CPU (0.8x) and is not used.
# x 1/4 was measured and rejected: at a 3-minute budget on MSD Hippocampus it did 352 iterations and reached
# Dice 0 / 0, x 1/2 did 244 iterations and reached 0.51 / 0 (the narrow net learns too little per step)
WIDTH_FACTORS = (1.0, 0.5)  # the widest that reaches TARGET_ITERATIONS wins, else the narrowest
TARGET_ITERATIONS = 1000  # iterations a budget should buy at least (4 nnU-Net epochs of 250)
CPU_MAX_BATCH = 2  # nnU-Net's minimum batch; more samples per step cost time a short budget lacks
EPOCHS_PER_BUDGET = 20  # budget-limited runs get ~20 epochs: ~20 pseudo-Dice points, EMA and best checkpoint
MIN_ITERATIONS_PER_EPOCH = 10
MAX_ITERATIONS_PER_EPOCH = 250  # the reference epoch


@dataclass
class BudgetChoice:
    """What :func:`adapt_to_budget` decided besides the configuration (all JSON-able)."""

    autocast: str | None = None  # "bfloat16" on CPUs with native bf16, else None (CUDA: the trainer's AMP)
    num_threads: int | None = None  # torch intra-op threads for the training process (None: leave as is)
    iterations_per_epoch: int | None = None
    seconds_per_iteration: float | None = None  # measured for the chosen configuration
    width_factor: float = 1.0

    def to_json(self) -> dict:
        return asdict(self)


def iterations_per_epoch_for(budget_seconds: float, seconds_per_iteration: float) -> int:
    """Iterations per epoch so that the budget holds about EPOCHS_PER_BUDGET epochs, in [10, 250]."""
    total = budget_seconds / max(seconds_per_iteration, 1e-6)
    per_epoch = int(round(total / EPOCHS_PER_BUDGET))
    return max(MIN_ITERATIONS_PER_EPOCH, min(MAX_ITERATIONS_PER_EPOCH, per_epoch))


def adapt_to_budget(
    configuration: Configuration,
    budget_seconds: float,
    device: torch.device | str,
    seconds_per_iteration: Callable[[Configuration, str | None], float] | None = None,
    bf16_supported: bool | None = None,
    num_threads: int | None = None,
) -> tuple[Configuration, list[str], BudgetChoice]:
    """The configuration to train under ``budget_seconds`` of wall-clock time on ``device``.

    CUDA/MPS: the plan unchanged (it was sized for the GPU's memory; AMP is on anyway); only the iterations
    per epoch follow the budget when a step time is known. CPU: batch capped at 2, bf16 autocast where the
    CPU has native bf16, and the widest of features x 1, 1/2 whose measured step time buys at least
    TARGET_ITERATIONS iterations in the budget (else x 1/2). ``seconds_per_iteration(config,
    autocast)`` measures one training step (the trainer times a warm step on random data); it is called
    from the narrowest candidate upwards and not again once a candidate misses the target, so measuring
    costs a few narrow steps. Returns (configuration, reasons for the log, choice).
    """
    device = torch.device(device) if isinstance(device, str) else device
    reasons: list[str] = []
    choice = BudgetChoice(num_threads=num_threads)
    if device.type != "cpu":
        if seconds_per_iteration is not None:
            choice.seconds_per_iteration = float(seconds_per_iteration(configuration, None))
            choice.iterations_per_epoch = iterations_per_epoch_for(budget_seconds, choice.seconds_per_iteration)
            reasons.append(f"{device.type}: plan kept; {choice.iterations_per_epoch} iterations per epoch "
                           f"(~{EPOCHS_PER_BUDGET} epochs in the budget at {choice.seconds_per_iteration:.3f} s/iteration)")
        return configuration, reasons, choice

    config = copy.deepcopy(configuration)
    if config.batch_size > CPU_MAX_BATCH:
        reasons.append(f"batch {config.batch_size} -> {CPU_MAX_BATCH} (CPU budget: iterations count more than "
                       "samples per step)")
        config.batch_size = CPU_MAX_BATCH
    if bf16_supported is None:
        bf16_supported = cpu_supports_bf16()
    if bf16_supported:
        choice.autocast = "bfloat16"
        reasons.append("bf16 autocast on CPU (native bf16: ~1.4-1.8x faster steps)")
    if seconds_per_iteration is None:
        return config, reasons, choice

    chosen, chosen_time, chosen_factor = None, None, None
    for factor in sorted(WIDTH_FACTORS):  # narrowest first: cheap to measure
        candidate = with_width(config, factor)
        seconds = float(seconds_per_iteration(candidate, choice.autocast))
        if chosen is None or budget_seconds / seconds >= TARGET_ITERATIONS:
            chosen, chosen_time, chosen_factor = candidate, seconds, factor
        if budget_seconds / seconds < TARGET_ITERATIONS:
            break
    assert chosen is not None and chosen_time is not None and chosen_factor is not None
    if chosen_factor != 1.0:
        reasons.append(
            f"features {configuration.architecture.features} -> {chosen.architecture.features} (x {chosen_factor:g}): "
            f"{chosen_time:.3f} s/iteration buys ~{budget_seconds / chosen_time:.0f} iterations in "
            f"{budget_seconds:.0f} s (target >= {TARGET_ITERATIONS})")
    else:
        reasons.append(f"plan width kept: {chosen_time:.3f} s/iteration buys ~{budget_seconds / chosen_time:.0f} "
                       f"iterations in {budget_seconds:.0f} s")
    choice.width_factor = chosen_factor
    choice.seconds_per_iteration = chosen_time
    choice.iterations_per_epoch = iterations_per_epoch_for(budget_seconds, chosen_time)
    reasons.append(f"{choice.iterations_per_epoch} iterations per epoch (~{EPOCHS_PER_BUDGET} epochs in the budget)")
    chosen.notes = list(chosen.notes) + [f"--time-budget {budget_seconds:.0f}s: {r}" for r in reasons]
    return chosen, reasons, choice


# ------------------------------------------------------------------------------------------ the clock
PER_CASE_OVERHEAD_S = 0.75  # final validation, per case, besides the network (see FinalValidationReserve)
VALIDATION_OVERHEAD = 2.0  # an epoch-validation batch costs ~2x its forward time (sampling, loss, Dice counts)
VALIDATION_FRACTION = 0.2  # 50 validation iterations per 250 training iterations (the reference's ratio)


def epoch_validation_iterations(done: int, planned: int, budgeted: bool) -> int:
    """Validation iterations after ``done`` training iterations: the planned count, or under a budget (where
    an epoch may end early) 1/5 of the iterations actually done, at most the planned count."""
    if not budgeted:
        return planned
    return max(1, min(planned, round(done * VALIDATION_FRACTION)))


class FinalValidationReserve:
    """How much of a --time-budget to keep for the final checkpoint and the validation prediction.

    Estimate = number of sliding windows (step 0.5) over the validation cases x measured forward time per
    patch x mirror passes (2^dims), x 1.5 for resampling/writing, + PER_CASE_OVERHEAD_S per case (~0.5 s
    measured per Hippocampus case). Mirroring is dropped when it would take more than a quarter of the
    budget; before the first measurement 10 % of the budget is kept.
    ``case_shapes``: each validation case's shape after resampling ``[C, (Z,) Y, X]``.
    """

    def __init__(self, case_shapes: Sequence[Sequence[int]], patch_size: Sequence[int], validate: bool,
                 budget_s: float | None) -> None:
        self.validate, self.budget_s, self.dims = validate, budget_s, len(patch_size)
        self.windows = 0
        if validate and budget_s:
            for shape in case_shapes:
                spatial = shape[-self.dims:]
                count = int(np.prod([max(1, math.ceil((max(s, p) - p) / (p * 0.5)) + 1)
                                     for s, p in zip(spatial, patch_size)]))
                if self.dims == 2:
                    count *= int(shape[0])
                self.windows += count
        self.cases = len(case_shapes)

    def _seconds(self, seconds_per_patch: float | None, mirror: bool) -> float | None:
        if seconds_per_patch is None:
            return None
        passes = 2**self.dims if mirror else 1
        return self.windows * seconds_per_patch * passes * 1.5 + PER_CASE_OVERHEAD_S * self.cases

    def use_mirroring(self, seconds_per_patch: float | None, elapsed_s: float) -> bool:
        if not self.budget_s:
            return True
        seconds = self._seconds(seconds_per_patch, True)
        return seconds is not None and seconds <= 0.25 * self.budget_s and seconds <= self.budget_s - elapsed_s

    def seconds(self, seconds_per_patch: float | None) -> float:
        """Seconds to keep free at the end of the budget."""
        if not self.budget_s:
            return 0.0
        checkpoint_time = 1.0 + 0.01 * self.budget_s
        if not self.validate:
            return checkpoint_time
        measured = self._seconds(seconds_per_patch, self.use_mirroring(seconds_per_patch, 0.0))
        if measured is None:
            return 0.1 * self.budget_s
        return min(0.5 * self.budget_s, measured + checkpoint_time)


class BudgetClock:
    """The --time-budget policy in one object, and the one time source of a training run.

    ``now`` gives monotonic seconds (time.monotonic; a test passes a simulated clock, so what the policy
    decides no longer depends on how fast the machine is). ``used_before_s``: training time of earlier runs
    of this fold (--continue). Without a budget every question answers "go on"; ``now`` still times steps,
    epochs and checkpoints.

    The policy: training stops when one more step would eat into what is left after (a) the reserve for the
    final checkpoint and validation (:class:`FinalValidationReserve`), and (b) the validation phase the
    current epoch still owes (1/5 of its iterations, forward only, at VALIDATION_OVERHEAD x the measured
    forward time per patch). ``seconds_per_patch`` is read from the training state at each question: it is
    measured at the start and refined by every epoch's validation.
    """

    def __init__(self, budget_s: float | None, used_before_s: float, reserve: FinalValidationReserve,
                 validation_iterations: int, batch_size: int, now: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.budget_s = budget_s or None
        self.used_before_s = used_before_s
        self.reserve = reserve
        self.validation_iterations = validation_iterations
        self.batch_size = batch_size
        self.now = now
        self.started = now() if started is None else started
        self.last_step_s = 0.0

    @property
    def budgeted(self) -> bool:
        return self.budget_s is not None

    def elapsed(self) -> float:
        """Training seconds so far, earlier runs included."""
        return self.used_before_s + (self.now() - self.started)

    def left(self, seconds_per_patch: float | None, iterations_this_epoch: int = 0) -> float:
        """Seconds of training left (inf without a budget)."""
        if not self.budget_s:
            return math.inf
        owed = 0.0
        if iterations_this_epoch:
            owed = epoch_validation_iterations(iterations_this_epoch, self.validation_iterations, True) \
                * self.batch_size * (seconds_per_patch or 0.0) * VALIDATION_OVERHEAD
        return self.budget_s - self.reserve.seconds(seconds_per_patch) - owed - self.elapsed()

    def exhausted(self, seconds_per_patch: float | None) -> bool:
        """No time left for another epoch."""
        return self.left(seconds_per_patch) <= 0

    def step_fits(self, seconds_per_patch: float | None, iteration: int) -> bool:
        """Would one more step (as long as the last one) still fit before iteration ``iteration + 1`` ends?"""
        if not self.budget_s:
            return True
        return self.left(seconds_per_patch, iteration + 1) - self.last_step_s > 0

    def validation_deadline(self, seconds_per_patch: float | None) -> float | None:
        """``now()`` by which an epoch's validation must stop to keep the final reserve (None: no budget)."""
        if not self.budget_s:
            return None
        return self.started + self.budget_s - self.used_before_s - self.reserve.seconds(seconds_per_patch)

    def progress(self, epoch: int, epochs: int | None) -> float:
        """Fraction of training done, for the LR schedule: epochs, budget time, or the nearer of both."""
        return training_progress(epoch, epochs, self.elapsed() if self.budget_s else None, self.budget_s)

    def use_mirroring(self, seconds_per_patch: float | None) -> bool:
        return self.reserve.use_mirroring(seconds_per_patch, self.elapsed())

    def validation_iterations_after(self, done: int) -> int:
        return epoch_validation_iterations(done, self.validation_iterations, self.budgeted)
