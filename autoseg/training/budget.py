"""What a small ``--time-budget`` should buy: adapt the plan's network to the budget (issue 11 item 4).

Pure functions over :class:`~autoseg.contracts.plans.Configuration`; the trainer applies
:func:`adapt_to_budget` once at start, stores the adapted configuration in the checkpoint metadata (inference
builds its network from there) and logs the reasons. Nothing here switches on an architecture name: the
width of any network is its ``features`` list, scaled as a whole.

Evidence for the choices (per-iteration times, short budget-limited trainings on MSD Hippocampus and the
demo dataset): ``benchmarks/results/budget_study.md``, produced by ``benchmarks/budget_study.py``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch

from autoseg.contracts.plans import Configuration
from autoseg.device import cpu_supports_bf16

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
