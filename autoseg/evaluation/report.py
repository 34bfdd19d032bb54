"""The find-best report: one self-contained ``report.html`` (PNGs inlined as base64, no external resources,
opens offline) plus the same PNGs beside it.

Figures: per-label Dice box plots per candidate (configuration or ensemble), the training curves of every
fold of every trained model (from ``training_log.json``), and overlay slices of the chosen model's worst,
median and best cross-validation case.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autoseg.fileio import atomic_write, read_json

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


@dataclass
class OverlayCase:
    """One case to draw: which (worst/median/best), its Dice, and its files."""

    title: str
    case_id: str
    dice: float
    image: Path | None
    reference: Path
    prediction: Path


@dataclass
class ReportContent:
    """Everything the report shows; find_best fills it."""

    dataset: str
    labels: dict[int, str]
    ranking: list[tuple[str, float]]  # (candidate, mean foreground Dice), best first
    per_case_dice: dict[str, dict[int, list[float]]]  # candidate -> label -> Dice of each case
    training_logs: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # model -> fold -> curves
    overlays: list[OverlayCase] = field(default_factory=list)
    best: str = ""
    decision: list[str] = field(default_factory=list)  # lines of text: choice, postprocessing
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- training logs
def read_training_log(path: str | os.PathLike) -> dict[str, Any] | None:
    """Curves from a ``training_log.json``, read leniently: any of ``epochs``, ``train_loss``, ``val_loss``,
    ``pseudo_dice`` (per epoch a list of per-class values; reduced to their mean), ``lr``, ``epoch_time``.
    Missing keys are left out, non-numeric entries become NaN; None when the file is absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read training log (%s); its curves are left out of the report", path, exc)
        return None
    if not isinstance(data, dict):
        return None

    def number(value: Any) -> float:
        if isinstance(value, (list, tuple)):
            numbers = [number(v) for v in value]
            finite = [v for v in numbers if math.isfinite(v)]
            return float(np.mean(finite)) if finite else float("nan")
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    curves: dict[str, Any] = {}
    for key in ("train_loss", "val_loss", "pseudo_dice", "lr", "epoch_time"):
        values = data.get(key)
        if isinstance(values, list) and values:
            curves[key] = [number(v) for v in values]
    if not curves:
        return None
    length = max(len(v) for v in curves.values())
    epochs = data.get("epochs")
    curves["epochs"] = [number(e) for e in epochs] if isinstance(epochs, list) and len(epochs) == length else list(range(length))
    return curves


# ------------------------------------------------------------------------------------------- figures
def _figure_png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def dice_boxplot_png(per_case_dice: dict[str, dict[int, list[float]]], labels: dict[int, str]) -> bytes:
    """One panel per label, one box per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_case_dice)
    figure, axes = plt.subplots(1, max(1, len(labels)), figsize=(max(4.0, 1.2 * len(names)) * len(labels) + 1, 4.2),
                                squeeze=False)
    for axis, (label, label_name) in zip(axes[0], labels.items()):
        data = [per_case_dice[name].get(label, []) for name in names]
        axis.boxplot(data, showmeans=True)
        axis.set_xticks(range(1, len(names) + 1))
        axis.set_xticklabels([_wrap(name) for name in names], rotation=30, ha="right", fontsize=8)
        axis.set_title(f"label {label}: {label_name}")
        axis.set_ylabel("Dice")
        axis.set_ylim(min(0.0, *[min(d) for d in data if d]) if any(data) else 0.0, 1.02)
        axis.grid(axis="y", alpha=0.3)
    return _figure_png(figure)


def _wrap(name: str) -> str:
    return name.replace(" + ", " +\n")


def training_curves_png(model: str, logs: dict[int, dict[str, Any]]) -> bytes:
    """Losses (train solid, validation dashed) and mean pseudo-Dice per fold of one trained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (fold, curves) in enumerate(sorted(logs.items())):
        colour = colours[index % len(colours)]
        epochs = curves["epochs"]
        if "train_loss" in curves:
            loss_axis.plot(epochs[: len(curves["train_loss"])], curves["train_loss"], color=colour, label=f"fold {fold} train")
        if "val_loss" in curves:
            loss_axis.plot(epochs[: len(curves["val_loss"])], curves["val_loss"], "--", color=colour, label=f"fold {fold} val")
        if "pseudo_dice" in curves:
            dice_axis.plot(epochs[: len(curves["pseudo_dice"])], curves["pseudo_dice"], color=colour, label=f"fold {fold}")
    loss_axis.set_title(f"{model}: loss")
    loss_axis.set_xlabel("epoch")
    dice_axis.set_title(f"{model}: pseudo-Dice (mean over labels)")
    dice_axis.set_xlabel("epoch")
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    return _figure_png(figure)


def overlay_png(case: OverlayCase) -> bytes:
    """The slice (first array axis) with the most reference foreground: image with the reference and the
    prediction drawn over it, side by side, at the physical aspect ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoseg.io import read_channels, read_segmentation

    reference, geometry = read_segmentation(case.reference)
    prediction, _ = read_segmentation(case.prediction)
    image = None
    if case.image is not None and Path(case.image).is_file():
        image = read_channels(case.image)[0][0]
    if reference.ndim == 3:
        counts = (reference != 0).reshape(reference.shape[0], -1).sum(axis=1)
        index = int(np.argmax(counts)) if counts.any() else reference.shape[0] // 2
        reference, prediction = reference[index], prediction[index]
        image = image[index] if image is not None and image.ndim == 3 else image
        aspect = geometry.spacing[1] / geometry.spacing[2]
        where = f", slice {index}"
    else:
        aspect = geometry.spacing[0] / geometry.spacing[1]
        where = ""
    if image is None or image.shape != reference.shape:
        image = np.zeros(reference.shape, np.float32)
    figure, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    vmax = max(1, int(max(reference.max(), prediction.max())))
    for axis, seg, title in ((axes[0], reference, "reference"), (axes[1], prediction, "prediction")):
        axis.imshow(image, cmap="gray", aspect=aspect, interpolation="nearest")
        axis.imshow(np.ma.masked_equal(seg, 0), cmap="tab10", vmin=0, vmax=max(9, vmax), alpha=0.45,
                    aspect=aspect, interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    figure.suptitle(f"{case.title}: {case.case_id} (mean foreground Dice {case.dice:.3f}{where})")
    return _figure_png(figure)


# ------------------------------------------------------------------------------------------- html
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.best { background: #e6f4e6; font-weight: bold; }
pre { background: #f4f4f4; padding: 0.8em; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(folder: str | os.PathLike, content: ReportContent) -> Path:
    """Write the PNGs and ``report.html`` into ``folder`` (each atomically); returns the HTML path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, bytes]] = []  # (section, file name, png)
    if content.per_case_dice:
        figures.append(("Dice per case", "dice_boxplot.png", dice_boxplot_png(content.per_case_dice, content.labels)))
    for model, logs in content.training_logs.items():
        if logs:
            figures.append((f"Training curves: {model}", f"curves_{_safe(model)}.png", training_curves_png(model, logs)))
    for case in content.overlays:
        try:
            figures.append((f"Overlay: {case.title} case", f"overlay_{_safe(case.title)}.png", overlay_png(case)))
        except Exception as exc:  # a figure must never cost the user the whole report
            log.warning("overlay of %s failed (%s); left out of the report", case.case_id, exc)
    for _, name, png in figures:
        atomic_write(folder / name, lambda handle, png=png: handle.write(png))

    labels = list(content.labels)
    rows = []
    for name, score in content.ranking:
        label_means = [
            np.mean(content.per_case_dice.get(name, {}).get(label, [float("nan")])) for label in labels
        ]
        cells = "".join(f"<td>{value:.4f}</td>" for value in label_means)
        css = ' class="best"' if name == content.best else ""
        rows.append(f"<tr{css}><td>{html.escape(name)}</td><td>{score:.4f}</td>{cells}</tr>")
    header = "".join(f"<th>Dice {label} {html.escape(content.labels[label])}</th>" for label in labels)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>autoseg find-best: {html.escape(content.dataset)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>autoseg find-best: {html.escape(content.dataset)}</h1>",
        "<h2>Ranking (cross-validation, mean foreground Dice)</h2>",
        f"<table><tr><th>candidate</th><th>mean foreground Dice</th>{header}</tr>{''.join(rows)}</table>",
        "<h2>Decision</h2>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in content.decision) + "</ul>",
    ]
    if content.commands:
        parts.append("<h2>How to predict</h2><pre>" + html.escape("\n".join(content.commands)) + "</pre>")
    if content.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in content.notes) + "</ul>")
    for section, name, png in figures:
        parts.append(f"<h2>{html.escape(section)}</h2>{_img(png, name)}")
    parts.append("</body></html>")
    text = "\n".join(parts) + "\n"
    target = folder / REPORT_FILE
    atomic_write(target, lambda handle: handle.write(text.encode("utf-8")))
    return target


def pick_overlay_cases(case_scores: Sequence[tuple[str, float]]) -> list[tuple[str, str, float]]:
    """``(title, case_id, score)`` of the worst, median and best case (fewer when there are fewer cases)."""
    ordered = sorted(case_scores, key=lambda item: (item[1], item[0]))
    if not ordered:
        return []
    picks = [("worst", ordered[0]), ("median", ordered[(len(ordered) - 1) // 2]), ("best", ordered[-1])]
    seen, result = set(), []
    for title, (case_id, score) in picks:
        if case_id not in seen:
            seen.add(case_id)
            result.append((title, case_id, score))
    return result
