"""The training loop: epochs of steps, each epoch closed by a validation phase, until the epochs or the
time budget run out. Everything it uses is a part (parts.py); it decides only when to stop and when to save.

Reference behaviour (the nnU-Net method, Isensee et al., Nature Methods 2021): 250 iterations per epoch,
then 50 validation iterations on random patches (loss and pseudo-Dice, no augmentation); the EMA (0.9/0.1) of
the mean pseudo-Dice picks checkpoint_best; checkpoint_latest every 50 epochs. We also save latest every 5
minutes (checked at every iteration) and at SIGINT/SIGTERM, so a kill loses minutes, not epochs.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from autoseg.contracts.checkpoint import BEST, FINAL, LATEST
from autoseg.errors import TrainingError, TrainingInterrupted
from autoseg.evaluation.metrics import dice_from_counts
from autoseg.training import distributed
from autoseg.training.job import FoldJob
from autoseg.training.losses import deep_supervision_loss
from autoseg.training.parts import TrainerParts, autocast
from autoseg.training.progress import Curves, duration_warning, iteration_bar
from autoseg.training.state import TrainingState, save_state

GRADIENT_CLIP = 12.0  # reference: gradient norm clipped at 12
EMA_DECAY = 0.9  # ema = 0.9 ema + 0.1 mean pseudo-Dice
CHECKPOINT_EVERY = 50  # epochs between checkpoint_latest.pt, as in the reference
# ... and at least every 5 minutes, checked at every iteration (mid-epoch too: a CPU epoch can take 10 minutes).
# A 3D U-Net checkpoint (weights + SGD momentum, ~250 MB) takes 0.5-3 s to write and fsync, so this costs
# at most ~1 % of the time, and a kill (without the SIGTERM that lets us save) loses 5 minutes at most.
CHECKPOINT_INTERVAL_S = 300.0


@dataclass
class LoopOptions:
    """How often the loop saves and validates, and who hears about each epoch."""

    checkpoint_every: int = CHECKPOINT_EVERY  # epochs between checkpoint_latest.pt
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S  # ... or this much time, checked every iteration
    on_epoch_end: Callable[[int, Curves], None] | None = None  # notebooks, tests
    after_epoch: Callable[[TrainingState], None] | None = None  # the epoch line, curves, progress.png (rank 0)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A seed per (run seed, epoch, rank): each epoch's random stream depends only on these, so resuming
    from an epoch boundary replays exactly what an uninterrupted run would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def interrupted(output: Path, command: str, what: str, signum: int) -> TrainingInterrupted:
    """The message of a stopped run: the resume command only when there is a checkpoint to resume from."""
    from autoseg.training.run import RUN_FILE

    for name in (LATEST, FINAL):
        if (output / name).is_file():
            return TrainingInterrupted(
                f"{output}: {what}; {name} is saved: resume with `{command} --continue`", 128 + int(signum))
    return TrainingInterrupted(
        f"{output}: {what} before a resumable checkpoint was saved; run `{command} --continue` to start that run again "
        f"with its options ({RUN_FILE})", 128 + int(signum))


class StopRequest:
    """SIGINT/SIGTERM during training (Ctrl-C, a cluster's pre-emption, which sends SIGTERM and kills a little
    later): remembered by the handler, acted on by the loop at the next iteration boundary (save
    checkpoint_latest.pt, then stop), since a checkpoint cannot be written from inside a signal handler. A second
    Ctrl-C stops at once. Handlers can only be set in the main thread; elsewhere (a notebook's worker thread)
    the default behaviour stays."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"{signal.Signals(signum).name}: saving {LATEST} after this iteration, then stopping "
                    "(Ctrl-C again stops at once, without saving)\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------------- step
def train_step(parts: Any, batch: dict[str, Any], device: torch.device, epoch: int, iteration: int,
               output: Path) -> float:
    """One optimiser step on ``batch``; returns the loss. ``parts`` needs model, optimizer, loss, ds_weights,
    dtype, scaler and selfreg (TrainerParts, or the small set a timing probe builds)."""
    data = batch["data"].to(device, non_blocking=True)
    targets = [t.to(device, non_blocking=True) for t in batch["target"]]
    if not torch.isfinite(data).all():
        raise TrainingError(
            f"{output}: the training batch of epoch {epoch} iteration {iteration} contains NaN/Inf intensities "
            f"(cases {', '.join(batch.get('keys', []))}); re-run `autoseg preprocess` for them; the last good "
            f"checkpoint ({LATEST}) is kept"
        )
    parts.optimizer.zero_grad(set_to_none=True)
    with autocast(device, parts.dtype):
        if parts.selfreg is not None:
            outputs, features = parts.model(data, return_features=True)
        else:
            outputs = parts.model(data)
        loss = deep_supervision_loss(outputs, targets, parts.loss, parts.ds_weights)
        if parts.selfreg is not None:
            loss = loss + parts.selfreg(features)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{output}: the loss became {loss.item()} at epoch {epoch} iteration {iteration}; training stopped and "
            f"the last good checkpoint ({LATEST}) is kept. Check the preprocessed data, or resume with --continue "
            "(a different random stream often avoids a rare instability)"
        )
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), GRADIENT_CLIP)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), GRADIENT_CLIP)
        parts.optimizer.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------- validation
def pseudo_dice_counts(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[3, K-1]`` true positives, false positives, false negatives per foreground class of the argmax
    prediction of ``logits [B, K, *S]`` against ``target [B, 1, *S]`` (summed over the batch)."""
    prediction = logits.argmax(1)
    labels = target[:, 0].long()
    counts = torch.zeros(3, num_classes - 1, dtype=torch.float64, device=logits.device)
    for k in range(1, num_classes):
        p, g = prediction == k, labels == k
        counts[0, k - 1] = (p & g).sum()
        counts[1, k - 1] = (p & ~g).sum()
        counts[2, k - 1] = (~p & g).sum()
    return counts


def validate_epoch(parts: TrainerParts, job: FoldJob, state: TrainingState, iterations: int,
                   rng: np.random.Generator, deadline: float | None = None) -> tuple[float, list[float]]:
    """Loss and pseudo-Dice (NaN for a class absent from every batch) on random validation patches, no
    augmentation; also measures the forward time per patch, which sizes the time reserved for the final
    validation under --time-budget. With a ``deadline`` (clock time) it stops after the first batch that ends
    past it."""
    model, device, now = parts.model, job.device, parts.clock.now
    num_classes = job.plans.num_classes
    model.eval()
    losses, counts = [], torch.zeros(3, num_classes - 1, dtype=torch.float64, device=device)
    forward_time, patches = 0.0, 0
    with torch.no_grad():
        for _ in range(iterations):
            batch = parts.val_transforms(**parts.val_sampler.sample_batch(rng))
            data = torch.from_numpy(batch["data"]).to(device)
            targets = [torch.from_numpy(t).to(device) for t in batch["target"]]
            start = now()
            with autocast(device, parts.dtype):
                outputs = model(data)
            forward_time += now() - start
            patches += data.shape[0]
            losses.append(float(deep_supervision_loss(outputs, targets, parts.loss, parts.ds_weights)))
            first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            counts += pseudo_dice_counts(first, targets[0], num_classes)
            if deadline is not None and now() >= deadline:
                break
    distributed.all_reduce_sum(counts, job.context)
    if patches:
        state.seconds_per_patch = forward_time / patches
    tp, fp, fn = counts.tolist()
    return float(np.mean(losses)), [dice_from_counts(*c) for c in zip(tp, fp, fn)]


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


# ------------------------------------------------------------------------------------------------- loop
def run_epochs(job: FoldJob, parts: TrainerParts, state: TrainingState, options: LoopOptions) -> str | None:
    """Train until the epochs or the budget are used up; returns why it stopped early ("time budget") or
    None. A signal saves checkpoint_latest.pt and raises TrainingInterrupted with the resume command."""
    clock, context, device, seed = parts.clock, job.context, job.device, job.run.seed
    last_save = clock.now()
    stop_reason = None
    session_steps, timing_start = 0, 0.0  # for the duration estimate of a long CPU run

    def flag(value: bool) -> bool:  # every rank takes the same decision
        return distributed.broadcast_flag(value, context, device)

    def save_latest() -> None:
        nonlocal last_save
        if context.is_main:
            save_state(job.output / LATEST, job, parts, state)
        last_save = clock.now()

    stop, bar = StopRequest(), None
    try:
        stop.__enter__()
        while parts.total_epochs is None or state.epoch < parts.total_epochs:
            if flag(clock.exhausted(state.seconds_per_patch)):
                stop_reason = "time budget"
                break
            epoch, epoch_start = state.epoch, clock.now()
            # a checkpoint saved mid-epoch resumes at its iteration, with the RNG states it saved
            first_iteration, losses = state.epoch_iteration, list(state.epoch_losses)
            state.epoch_iteration, state.epoch_losses = 0, []
            if first_iteration == 0:
                seed_everything(epoch_seed(seed, epoch, context.rank, 1))
            parts.model.train()
            lr, done = parts.schedule.lr(0.0), first_iteration
            bar = iteration_bar(epoch, parts.total_epochs, parts.iterations, first_iteration, context.is_main)
            for iteration in range(first_iteration, parts.iterations):
                # iteration boundary: a signal saves and stops here; and checkpoint_latest every few minutes
                stopping = flag(stop.signum is not None) if context.enabled else stop.signum is not None
                if stopping or clock.now() - last_save >= options.checkpoint_interval_s:
                    state.epoch_iteration, state.epoch_losses = iteration, list(losses)
                    save_latest()
                    state.epoch_iteration, state.epoch_losses = 0, []
                if stopping:
                    signum = stop.signum or signal.SIGTERM
                    raise interrupted(job.output, job.command, f"{signal.Signals(signum).name} at epoch {epoch} "
                                      f"iteration {iteration}", signum)
                # the clock is checked every iteration: a budget ends mid-epoch (step time known from the
                # previous iteration, so the check is "would one more step still fit")
                if clock.budgeted and flag(not clock.step_fits(state.seconds_per_patch, iteration)):
                    stop_reason = "time budget"
                    break
                lr = parts.schedule.lr(clock.progress(epoch, parts.total_epochs))
                for group in parts.optimizer.param_groups:
                    group["lr"] = lr
                step_start = clock.now()
                loss = train_step(parts, next(parts.train_loader), device, epoch, iteration, job.output)
                losses.append(loss)
                done += 1
                state.iterations_done += 1
                clock.last_step_s = clock.now() - step_start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                session_steps += 1
                if session_steps == 1:  # the first step warms up (allocator, oneDNN caches): time the next 3
                    timing_start = clock.now()
                elif session_steps == 4 and device.type == "cpu" and not clock.budgeted and parts.total_epochs:
                    warning = duration_warning((clock.now() - timing_start) / 3,
                                               parts.total_epochs * parts.iterations - state.iterations_done)
                    if warning:
                        job.say(warning)
            bar.close()
            if not done:  # the budget ended before this epoch's first step
                break
            _close_epoch(job, parts, state, losses, lr, epoch, epoch_start, done, options)
            if state.epoch % max(1, options.checkpoint_every) == 0 \
                    or clock.now() - last_save >= options.checkpoint_interval_s:
                save_latest()
            if options.on_epoch_end is not None:
                options.on_epoch_end(state.epoch, state.curves)
            if stop_reason:
                break
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
    return stop_reason


def _close_epoch(job: FoldJob, parts: TrainerParts, state: TrainingState, losses: list[float], lr: float,
                 epoch: int, epoch_start: float, done: int, options: LoopOptions) -> None:
    """The epoch's validation phase, curves, EMA and checkpoint_best."""
    context, clock = job.context, parts.clock
    val_loss, dice = validate_epoch(parts, job, state, clock.validation_iterations_after(done),
                                    np.random.default_rng(epoch_seed(job.run.seed, epoch, context.rank, 3)),
                                    clock.validation_deadline(state.seconds_per_patch))
    train_loss = float(np.mean(losses)) if losses else float("nan")
    if context.enabled:
        pair = distributed.all_reduce_sum(torch.tensor([train_loss, val_loss], device=job.device), context)
        train_loss, val_loss = (pair / context.world_size).tolist()
    mean_dice = finite_mean(dice)
    state.ema = mean_dice if state.ema is None else EMA_DECAY * state.ema + (1 - EMA_DECAY) * mean_dice
    state.epoch = epoch + 1
    state.curves.append(state.epoch, train_loss, val_loss, dice, lr, clock.now() - epoch_start, state.ema)
    if context.is_main:
        if options.after_epoch is not None:
            options.after_epoch(state)
        if state.ema > state.best_ema:
            state.best_ema = state.ema
            save_state(job.output / BEST, job, parts, state)
            job.say(f"new best EMA pseudo-Dice {state.ema:.4f}: {BEST}")
