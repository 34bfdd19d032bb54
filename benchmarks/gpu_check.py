"""GPU check on large CT phantoms: the planner's memory estimate against real AMP training steps, per architecture.

One prepared script for a machine with one GPU, finishing within ``--time-limit`` (default 450 s, under the
8 minutes a device check gets):

1. Generate ``--cases`` CT phantoms (autoseg.dataset.phantom_ct; default 2 cases of 400 x 512 x 512 voxels of
   1.25 x 0.8 x 0.8 mm with 32 classes, stored as uncompressed .nii so writing and reading cost little) under
   ``--work``.
2. Fingerprint and plan them with autoseg's planner at the ``--gpu-memory`` budget (default 8 GB), base
   configuration ``3d_fullres``, each registered architecture planned on its own: one whose planning raises is
   an error row; one the planner leaves out of plans.json is named in a note; only configurations present in
   the merged plans are run.
3. For each planned configuration, inside its own ``try`` (a failure, an out-of-memory included, becomes a
   table row with the error, never a crash):
   - build the network with ``autoseg.networks.build`` from the configuration's architecture spec;
   - ``--steps`` training steps after one warm-up step at the planned patch and batch on random data: forward
     under ``torch.autocast`` (autoseg's AMP dtype: bf16 where supported, else fp16 with a GradScaler), deep-
     supervision Dice + CE loss (``autoseg.training.losses.deep_supervision_loss`` with the network's own
     ``ds_weights``), backward, gradient clipping at 12, SGD (momentum 0.99, Nesterov);
   - ``torch.cuda.max_memory_allocated`` over those steps, the peak statistics reset before the network is
     built (weights, optimiser state and the batch count, as they count in the planner's estimate), against
     ``configuration.memory_estimate_bytes``;
   - median step time (CUDA synchronised);
   - the sliding-window prediction time of the first case, preprocessed once per target spacing with the
     Predictor's own preprocessing, through ``Predictor.predict_preprocessed`` (step 0.5, Gaussian, mirroring
     as ``--mirror``; default off) with the RANDOM-INIT network: a timing of the network and tiling, not of
     a trained model. Preprocessing time is reported once beside the table.
4. A global time guard: before each architecture (and before its prediction) the remaining time is checked
   against what the previous architecture needed; what does not fit becomes a "skipped (time guard)" row.

``--dry-run``: tiny phantoms (2 cases of 20 x 32 x 32, 12 classes), one step without warm-up, CPU, no CUDA call at all; the
table has the same columns with "n/a" memory. This is what the test suite runs.

    python benchmarks/gpu_check.py --out bench_out/gpu_check.md               # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry.md      # anywhere, < 1 min
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported by the tests too

from common import format_seconds, machine_description, markdown_table  # noqa: E402

DATASET = "Dataset950_CTPhantom"
GIB = 2**30
HEADERS = ["configuration", "architecture", "patch", "batch", "estimate GiB", "measured GiB", "measured / estimate",
           "step s", "predict s", "status"]


@dataclass
class Row:
    """One architecture's result. Memory in bytes (None: not measured), times in seconds."""

    configuration: str
    architecture: str
    patch: list[int] = field(default_factory=list)
    batch: int = 0
    estimate_bytes: int = 0
    measured_bytes: int | None = None
    step_s: float | None = None
    predict_s: float | None = None
    status: str = "ok"

    def cells(self) -> list[str]:
        ratio = "n/a"
        if self.measured_bytes is not None and self.estimate_bytes:
            ratio = f"{self.measured_bytes / self.estimate_bytes:.2f}"
        return [
            self.configuration, self.architecture, "x".join(str(p) for p in self.patch) or "-",
            str(self.batch or "-"),
            f"{self.estimate_bytes / GIB:.2f}" if self.estimate_bytes else "-",
            f"{self.measured_bytes / GIB:.2f}" if self.measured_bytes is not None else "n/a",
            ratio,
            f"{self.step_s:.3f}" if self.step_s is not None else "-",
            f"{self.predict_s:.1f}" if self.predict_s is not None else "-",
            self.status,
        ]


class TimeGuard:
    """Wall-clock budget for the whole script: ``fits(cost)`` says whether ``cost`` seconds remain."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + limit_s

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def fits(self, cost_s: float) -> bool:
        return self.remaining() >= cost_s


def error_status(exc: BaseException) -> str:
    """A one-line table cell for a failure: exception type and the first line of its message, shortened."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"error: {type(exc).__name__}" + (f": {message}" if message else "")
    return text if len(text) <= 160 else text[:157] + "..."


def format_report(rows: Sequence[Row], context: dict[str, Any]) -> str:
    """The markdown written to ``--out``: a caption of what ran, the table, and notes."""
    lines = [
        f"## GPU check: planner memory estimate vs measured ({context['date']})",
        "",
        f"Machine: {context['machine']}; device {context['device']}; torch {context['torch']}; "
        f"AMP {context['amp']}; budget {context['gpu_memory_gb']} GB.",
        f"Data: {context['cases']} CT phantom case(s), shapes {context['shapes']}, {context['classes']} classes; "
        f"predicted case {context['predict_shape']} after preprocessing ({context['preprocess']}), mirroring "
        f"{'on' if context['mirror'] else 'off'}, random-init weights (timing only).",
        f"Training: {context['steps']} timed AMP step(s) after {context['warmup']} warm-up, median; memory = "
        "torch.cuda.max_memory_allocated from before the network is built.",
        "",
        markdown_table(HEADERS, [row.cells() for row in rows]),
    ]
    if context.get("notes"):
        lines += [""] + [f"- {note}" for note in context["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ stages
def make_data(work: Path, cases: int, classes: int, slices: int, in_plane: int, dry_run: bool) -> Path:
    """Generate the phantoms (once per settings: a marker file records them) and return the raw folder."""
    from autoseg.dataset.phantom_ct import PhantomSpec, generate_ct_phantoms

    if dry_run:
        spec = PhantomSpec(num_cases=2, num_classes=12, slices=(320, 320), scale=0.0625,
                           slice_spacing_mm=(1.0, 2.0), file_ending=".nii")  # 20 x 32 x 32 voxels
    else:
        # one spacing for all cases: the target spacing is then theirs, and preprocessing the predicted case
        # does not spend a minute of the 8 resampling 100 M voxels on the CPU
        spec = PhantomSpec(num_cases=cases, num_classes=classes, slices=(slices, slices), in_plane=in_plane,
                           slice_spacing_mm=(1.25, 1.25), in_plane_spacing_mm=(0.8, 0.8), file_ending=".nii")
    raw = work / "raw" / DATASET
    marker = raw / "phantom_spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if not (marker.is_file() and marker.read_text() == wanted):
        shutil.rmtree(raw, ignore_errors=True)
        generate_ct_phantoms(raw, spec)
        marker.write_text(wanted)
    return raw


def plan(raw: Path, gpu_memory_gb: float, num_workers: int, architectures: Sequence[str] | None
         ) -> tuple[Any, Any, list[Row]]:
    """Fingerprint, then plans of 3d_fullres for each architecture on its own (every registered one unless
    restricted), merged into one Plans; an architecture whose planning raises becomes an error row instead of
    ending the check. Returns (fingerprint, plans or None, error rows). Nothing is written."""
    from autoseg import networks
    from autoseg.planning import extract_fingerprint, plan_from_fingerprint

    fingerprint = extract_fingerprint(raw, num_workers=num_workers, progress=False)
    fingerprint.dataset_name = raw.name
    merged, failed = None, []
    # 2D-only architectures (unet2022) have no 3d_fullres configuration to check
    three_d = [a for a in (architectures or networks.available()) if 3 in networks.get(a).dims]
    for architecture in three_d:
        try:
            plans = plan_from_fingerprint(fingerprint, gpu_memory_gb=gpu_memory_gb, configurations=["3d_fullres"],
                                          architectures=[architecture])
        except Exception as exc:  # noqa: BLE001 - one architecture's planning failure is a row, not a crash
            failed.append(Row("3d_fullres", architecture, status="planning " + error_status(exc)))
            continue
        if merged is None:
            merged = plans
        else:
            merged.configurations.update(plans.configurations)
    return fingerprint, merged, failed


def random_batch(network: Any, configuration: Any, in_channels: int, num_classes: int, device: Any):
    """Data ``[B, C, *patch]`` and one target ``[B, 1, *scaled patch]`` per deep-supervision output."""
    import torch

    spec = configuration.architecture
    scales = list(getattr(network, "ds_scales", [(1.0,) * configuration.dims])) if spec.deep_supervision \
        else [(1.0,) * configuration.dims]
    generator = torch.Generator().manual_seed(0)
    batch = configuration.batch_size
    data = torch.randn((batch, in_channels, *configuration.patch_size), generator=generator)
    targets = [torch.randint(0, num_classes, (batch, 1, *[max(1, round(p * f)) for p, f in
                                                         zip(configuration.patch_size, scale)]),
                             generator=generator).float() for scale in scales]
    return data.to(device), [t.to(device) for t in targets]


def train_steps(plans: Any, configuration: Any, device: Any, steps: int, warmup: int = 1
                ) -> tuple[Any, list[float], int | None]:
    """Build the network, run ``warmup + steps`` AMP training steps; returns (network, the timed steps'
    seconds, peak bytes allocated on CUDA or None elsewhere)."""
    import torch

    from autoseg import networks
    from autoseg.device import amp_dtype
    from autoseg.training.losses import DEFAULT_LOSS, LossContext, build_loss, deep_supervision_loss

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as our trainer sets it: the warm-up step pays the kernel search
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    in_channels = plans.network_in_channels(configuration)
    network = networks.build(configuration.architecture.network_spec(in_channels, plans.num_classes)).to(device)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    weights = list(getattr(network, "ds_weights", [1.0])) if configuration.architecture.deep_supervision else [1.0]
    data, targets = random_batch(network, configuration, in_channels, plans.num_classes, device)
    loss_fn = build_loss(DEFAULT_LOSS, LossContext(configuration.dims, plans.num_classes, configuration.dims == 2))
    times = []
    for _ in range(steps + warmup):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = deep_supervision_loss(network(data), targets, loss_fn, weights)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"loss became {float(loss.detach())}")
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    del optimizer, data, targets, loss
    return network, times[warmup:], peak


def predict_time(network: Any, plans: Any, configuration: Any, data: Any, device: Any, mirror: bool) -> float:
    """Seconds of ``Predictor.predict_preprocessed`` on a preprocessed ``[C, Z, Y, X]`` array."""
    import torch

    from autoseg.inference.predictor import Predictor

    predictor = Predictor([network], plans, configuration, plans.network_in_channels(configuration),
                          device=device, mirror=mirror)
    start = time.perf_counter()
    predictor.predict_preprocessed(data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_configuration(name: str, plans: Any, device: Any, steps: int, mirror: bool, guard: TimeGuard,
                        expected_cost_s: float, preprocessed: Callable[[Any], Any], warmup: int = 1) -> Row:
    """One table row; every failure is caught and reported in the row."""
    configuration = plans.configurations[name]
    row = Row(name, configuration.architecture.name, list(configuration.patch_size), configuration.batch_size,
              int(configuration.memory_estimate_bytes))
    if not guard.fits(expected_cost_s):
        row.status = f"skipped (time guard: {guard.remaining():.0f} s left)"
        return row
    network = None
    try:
        network, times, row.measured_bytes = train_steps(plans, configuration, device, steps, warmup)
        row.step_s = statistics.median(times)
        predict_cost = 0.5 * expected_cost_s
        if not guard.fits(predict_cost):
            row.status = "ok (predict skipped: time guard)"
            return row
        network.eval()
        row.predict_s = predict_time(network, plans, configuration, preprocessed(configuration), device, mirror)
    except Exception as exc:  # noqa: BLE001 - one architecture's failure must not stop the others
        row.status = error_status(exc)
        traceback.print_exc()
    finally:
        del network
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_out/gpu_check"), help="data and plans go here")
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_check.md"), help="markdown table")
    parser.add_argument("--cases", type=int, default=2, help="phantom cases to generate and plan (2-4)")
    parser.add_argument("--classes", type=int, default=32, help="foreground classes of the phantoms")
    parser.add_argument("--slices", type=int, default=400, help="slices per case")
    parser.add_argument("--in-plane", type=int, default=512, help="in-plane size (pixels)")
    parser.add_argument("--gpu-memory", type=float, default=8.0, help="planner budget in GB")
    parser.add_argument("--arch", nargs="*", default=None, help="architectures to plan (default: all registered)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after one warm-up")
    parser.add_argument("--mirror", action="store_true", help="mirror the sliding window over all axes (8x work)")
    parser.add_argument("--time-limit", type=float, default=450.0, help="stop starting new work after this (s)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu; --dry-run forces cpu")
    parser.add_argument("--workers", type=int, default=4, help="fingerprinting processes")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny phantoms, 1 step, CPU, no CUDA call; memory columns read n/a")
    args = parser.parse_args(argv)

    guard = TimeGuard(args.time_limit)
    import torch

    from autoseg.device import amp_dtype, choose_device
    from autoseg.io import read_image

    device = torch.device("cpu") if args.dry_run else choose_device(args.device)
    steps = 1 if args.dry_run else args.steps
    args.work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    start = time.perf_counter()
    raw = make_data(args.work, args.cases, args.classes, args.slices, args.in_plane, args.dry_run)
    notes.append(f"phantoms ready in {format_seconds(time.perf_counter() - start)}")
    start = time.perf_counter()
    fingerprint, plans, rows = plan(raw, args.gpu_memory, args.workers, args.arch)
    configurations = sorted(plans.configurations) if plans is not None else []
    notes.append(f"fingerprint + plan in {format_seconds(time.perf_counter() - start)}; configurations in "
                 f"plans: {', '.join(configurations) or 'none'}")
    from autoseg import networks
    from autoseg.contracts.plans import save_plans

    if plans is not None:
        save_plans(plans, args.work / "plans.json")
    planned = {c.architecture.name for c in plans.configurations.values()} if plans is not None else set()
    tried = [a for a in (args.arch or networks.available()) if 3 in networks.get(a).dims]
    absent = [a for a in tried if a not in planned and a not in {r.architecture for r in rows}]
    if absent:
        notes.append(f"registered but not in plans.json (left out by the planner): {', '.join(absent)}")

    case_files = sorted((raw / "imagesTr").glob("*_0000.nii"))
    image, geometry = read_image(case_files[0])
    cache: dict[tuple, Any] = {}
    preprocess_info = {"text": "not run"}

    def preprocessed(configuration: Any) -> Any:
        """The first case preprocessed for ``configuration`` (cached per target spacing and normalisation)."""
        from autoseg.inference.predictor import preprocessing_functions

        key = (tuple(configuration.target_spacing), tuple(configuration.normalization), configuration.data_identifier)
        if key not in cache:
            preprocess_case, _, _ = preprocessing_functions()
            begin = time.perf_counter()
            data, _, _ = preprocess_case(image, geometry, plans, configuration, case_id=case_files[0].name)
            preprocess_info["text"] = f"{format_seconds(time.perf_counter() - begin)} on the CPU, once"
            cache[key] = data
        return cache[key]

    expected_cost = 20.0 if not args.dry_run else 0.0  # first architecture: a guess; then the last one's cost
    for name in sorted(configurations, key=lambda n: (n != "3d_fullres", n)):
        begin = time.perf_counter()
        rows.append(check_configuration(name, plans, device, steps, args.mirror, guard, expected_cost, preprocessed,
                                        warmup=0 if args.dry_run else 1))
        if rows[-1].step_s is not None:
            expected_cost = max(expected_cost, time.perf_counter() - begin)
    cache_shape = next(iter(cache.values())).shape[1:] if cache else None

    context = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine_text(), "device": str(device) + (" (dry run)" if args.dry_run else ""),
        "torch": torch.__version__, "amp": str(amp_dtype(device)).replace("torch.", "") if device.type == "cuda" else "none (CPU)",
        "gpu_memory_gb": args.gpu_memory, "cases": fingerprint.num_cases,
        "shapes": ", ".join("x".join(str(int(s)) for s in shape) for shape in fingerprint.shapes_after_crop),
        "classes": len(fingerprint.labels) - 1,
        "predict_shape": "x".join(str(s) for s in cache_shape) if cache_shape is not None else "-",
        "preprocess": preprocess_info["text"], "mirror": args.mirror, "steps": steps,
        "warmup": 0 if args.dry_run else 1, "notes": notes,
    }
    if device.type == "cuda":
        context["machine"] += f"; GPU {torch.cuda.get_device_name(device)}"
    report = format_report(rows, context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    (args.out.with_suffix(".json")).write_text(json.dumps({"context": context, "rows": [asdict(r) for r in rows]},
                                                          indent=1))
    print(report)
    return 0


def _machine_text() -> str:
    machine = machine_description()
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"


if __name__ == "__main__":
    sys.exit(main())
