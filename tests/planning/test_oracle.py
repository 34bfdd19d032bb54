"""Our planner against nnU-Net v2 2.8.1 on the oracle datasets (shared/reference/oracle/).

Each oracle folder holds the recipe that regenerates a raw dataset and what nnU-Net planned for it. We
regenerate the dataset (all cases: the medians need them), plan it with the plain U-Net and compare.
Differences that remain by design are explained in docs/planning.md ("Differences from the oracle").
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoseg.planning.fingerprint import extract_fingerprint
from autoseg.planning.planner import plan_from_fingerprint

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ORACLE = SHARED / "reference" / "oracle"
DATASETS = sorted(p.name for p in ORACLE.glob("Dataset*")) if ORACLE.is_dir() else []
SCHEMES = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "NoNormalization": "none",
           "RescaleTo01Normalization": "rescale_0_1", "RGBTo01Normalization": "rgb_0_1"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATASETS, reason=f"no oracle datasets under {ORACLE}"),
]


def regenerate(name: str, out_root: Path) -> Path:
    """Run the recipe (``python ../shared/bench/make_synthetic.py OUT/<name> ...``) with our interpreter."""
    words = shlex.split((ORACLE / name / "recipe.txt").read_text().strip())
    assert words[0] == "python" and words[1].endswith("make_synthetic.py"), words
    script = SHARED / "bench" / "make_synthetic.py"
    args = [a.replace("OUT", str(out_root)) if a.startswith("OUT") else a for a in words[2:]]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    return out_root / name


@pytest.fixture(scope="module", params=DATASETS)
def planned(request, tmp_path_factory):
    name = request.param
    raw = regenerate(name, tmp_path_factory.mktemp("oracle"))
    fingerprint = extract_fingerprint(raw, num_workers=2, progress=False)
    plans = plan_from_fingerprint(fingerprint, architectures=["unet"])
    reference = json.loads((ORACLE / name / "nnUNetPlans.json").read_text())
    return plans, reference


def untranspose(values, transpose_forward):
    """nnU-Net's per-axis lists are in its transposed order; put them back in array order."""
    out = [None] * len(values)
    for i, axis in enumerate(transpose_forward):
        out[axis] = values[i]
    return out


def reference_configs(reference):
    """Per configuration name: (spacing, patch, batch, strides) in our array order."""
    forward = reference["transpose_forward"]
    result = {}
    for name, config in reference["configurations"].items():
        kwargs = config["architecture"]["arch_kwargs"]
        if len(config["spacing"]) == 3:
            spacing = untranspose(config["spacing"], forward)
            patch = untranspose(config["patch_size"], forward)
            strides = [untranspose(s, forward) for s in kwargs["strides"]]
        else:
            spacing, patch, strides = config["spacing"], config["patch_size"], kwargs["strides"]
        result[name] = (spacing, patch, config["batch_size"], strides)
    return result


def test_same_configurations(planned):
    plans, reference = planned
    assert set(plans.configurations) == set(reference["configurations"])


def test_target_spacing_per_configuration(planned):
    plans, reference = planned
    forward = reference["transpose_forward"]
    full = plans.configurations["3d_fullres"].target_spacing
    for name, (spacing, *_rest) in reference_configs(reference).items():
        ours = plans.configurations[name].target_spacing
        if len(spacing) == 2 and forward != sorted(forward):
            # nnU-Net slices along its transposed first axis; we always slice along array axis 0. Both take
            # the in-plane part of the 3d_fullres spacing (docs/planning.md, "axis transposition").
            assert np.allclose(ours, full[1:], rtol=1e-3)
            continue
        assert np.allclose(ours, spacing, rtol=1e-3), (name, ours, spacing)


def test_normalization_and_mask(planned):
    plans, reference = planned
    for name, config in reference["configurations"].items():
        ours = plans.configurations[name]
        assert ours.normalization == [SCHEMES[s] for s in config["normalization_schemes"]]
        assert ours.use_mask_for_norm == config["use_mask_for_norm"]


def test_pooling_pattern_and_sizes(planned):
    plans, reference = planned
    for name, (spacing, patch, batch, strides) in reference_configs(reference).items():
        ours = plans.configurations[name]
        pools = [sum(s[a] > 1 for s in ours.architecture.strides) for a in range(len(patch))]
        theirs = [sum(s[a] > 1 for s in strides) for a in range(len(patch))]
        assert pools == theirs, (name, pools, theirs)
        for p, q in zip(ours.patch_size, patch):
            assert 1 / 1.5 <= p / q <= 1.5, (name, ours.patch_size, patch)
        assert 1 / 1.5 <= ours.batch_size / batch <= 1.5, (name, ours.batch_size, batch)
