"""Parameter counts of our ``resenc`` against nnU-Net's ResidualEncoderUNet at the same plans.

For each reference topology the script builds our network (``autoseg.networks.build`` of a "resenc" spec, on the
``meta`` device: shapes only) and, in a subprocess of nnU-Net's venv, nnU-Net 2.8.1's own class
(``dynamic_network_architectures.architectures.unet.ResidualEncoderUNet``) with the arguments nnU-Net's ResEnc
planners write into their plans: ``n_blocks_per_stage`` (1, 3, 4, 6, 6, ...) truncated, one conv per decoder
stage, conv bias on, InstanceNorm (eps 1e-5, affine), LeakyReLU 0.01, deep supervision. Nothing of nnU-Net is
imported into our process or copied here; its class is only instantiated and its parameters counted.

Run from the repository root with our venv::

    .venv/bin/python benchmarks/resenc_parameters.py --nnunet-venv .venv-nnunet

Prints a markdown table (topology, ours, nnU-Net's, ratio); ``--ours-only`` skips nnU-Net.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Topology:
    """A plan's network numbers, in array axis order."""

    name: str
    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]


TOPOLOGIES = (
    # nnU-Net's 6-stage 3D plan of an isotropic CT set (features 32..320), 14 classes (BTCV-like)
    Topology("3D, 6 stages, 128^3, 32..320, 1 in / 14 classes", 1, 14, (128, 128, 128),
             ((1, 1, 1),) + ((2, 2, 2),) * 5, ((3, 3, 3),) * 6, (32, 64, 128, 256, 320, 320)),
    # the 2D plan of a 512x512 set: 7 stages, features capped at 512
    Topology("2D, 7 stages, 512^2, 32..512, 1 in / 4 classes", 1, 4, (512, 512),
             ((1, 1),) + ((2, 2),) * 6, ((3, 3),) * 7, (32, 64, 128, 256, 512, 512, 512)),
    # an anisotropic 3D plan (thick slices: kernel 1 and no pooling on the first axis at first)
    Topology("3D anisotropic, 5 stages, 20x192x160, 32..320, 1 in / 3 classes", 1, 3, (20, 192, 160),
             ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
             ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)), (32, 64, 128, 256, 320)),
    # the ResEnc M plan of a Hippocampus-like set (nnunet.md worked example: 40x56x40, 4 stages)
    Topology("3D, 4 stages, 40x56x40, 32..256, 1 in / 3 classes (Hippocampus-like)", 1, 3, (40, 56, 40),
             ((1, 1, 1),) + ((2, 2, 2),) * 3, ((3, 3, 3),) * 4, (32, 64, 128, 256)),
)

# Runs inside nnU-Net's venv: reads the topologies as JSON on stdin, prints one count per line.
_NNUNET_SIDE = """
import json, sys
from torch import nn
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
for t in json.load(sys.stdin):
    dims = len(t["patch_size"])
    n = len(t["features"])
    blocks = [(1, 3, 4, 6)[min(s, 3)] for s in range(n)]
    net = ResidualEncoderUNet(
        t["in_channels"], n, t["features"], {2: nn.Conv2d, 3: nn.Conv3d}[dims], t["kernel_sizes"], t["strides"],
        blocks, t["num_classes"], [1] * (n - 1), conv_bias=True,
        norm_op={2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims], norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    print(sum(p.numel() for p in net.parameters()))
"""


def ours(topology: Topology) -> int:
    import torch

    from autoseg.networks import NetworkSpec, build
    from autoseg.networks.summary import count_parameters

    with torch.device("meta"):
        network = build(NetworkSpec("resenc", topology.in_channels, topology.num_classes, topology.patch_size,
                                    topology.strides, topology.kernel_sizes, topology.features))
    return int(count_parameters(network))


def nnunets(topologies: tuple[Topology, ...], venv: Path) -> list[int]:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python}: no nnU-Net venv there; give --nnunet-venv (see benchmarks/README.md)")
    result = subprocess.run(
        [str(python), "-c", _NNUNET_SIDE], input=json.dumps([asdict(t) for t in topologies]),
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"nnU-Net side failed:\n{result.stderr[-2000:]}")
    return [int(line) for line in result.stdout.split()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, default=REPO / ".venv-nnunet",
                        help="venv with nnunetv2 2.8.1 (default: .venv-nnunet in the repository)")
    parser.add_argument("--ours-only", action="store_true", help="count our networks only")
    args = parser.parse_args(argv)

    counts = [ours(t) for t in TOPOLOGIES]
    theirs = [None] * len(TOPOLOGIES) if args.ours_only else nnunets(TOPOLOGIES, args.nnunet_venv)
    print("| topology | ours | nnU-Net 2.8.1 | ratio |")
    print("|---|---|---|---|")
    for topology, mine, other in zip(TOPOLOGIES, counts, theirs):
        other_text = "-" if other is None else f"{other:,}"
        ratio = "-" if other is None else f"{mine / other:.4f}"
        print(f"| {topology.name} | {mine:,} | {other_text} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
