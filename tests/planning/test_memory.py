import math

import pytest

from autoseg.networks import NetworkSpec
from autoseg.planning.memory import memory_budget_bytes, memory_components, training_memory_bytes
from autoseg.planning.topology import plan_topology


def nnunet_feature_map_elements(patch, strides, features, num_classes):
    """nnU-Net's VRAM proxy for the plain U-Net, counted from its published description (nnunet.md):
    two conv outputs per encoder stage; per decoder stage the transposed-conv output, two conv outputs and a
    deep-supervision head."""
    sizes, current = [], list(patch)
    for stride in strides:
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(math.prod(current))
    total = sum(2 * f * v for f, v in zip(features, sizes))
    for s in range(len(features) - 1, 0, -1):
        total += 3 * features[s - 1] * sizes[s - 1] + num_classes * sizes[s - 1]
    return total


@pytest.mark.parametrize("spacing,patch", [
    ([1.92, 0.81, 0.80], [44, 56, 48]),
    ([1.97, 0.79, 0.78], [96, 128, 128]),
    ([0.8, 0.8], [256, 256]),
])
def test_calibration_holds_bytes_per_nnunet_element(spacing, patch):
    # memory.py's calibration assumes 3.99 traced bytes per nnU-Net element on the plain U-Net
    topology = plan_topology(spacing, patch)
    per_sample, _ = memory_components(NetworkSpec("unet", 1, 3, topology.patch_size, topology.strides,
                                                  topology.kernel_sizes, topology.features))
    elements = nnunet_feature_map_elements(topology.patch_size, topology.strides, topology.features, 3)
    assert per_sample / elements == pytest.approx(3.99, rel=0.01)


def test_budget_matches_nnunet_reference_for_3d():
    # nnU-Net: 560e6 elements per sample at batch 2 for 8 GB; ours is within 10 % after parameters
    assert memory_budget_bytes(8.0) == pytest.approx(2 * 560e6 * 3.99, rel=0.1)
    assert memory_budget_bytes(16.0) == 2 * memory_budget_bytes(8.0) or abs(
        memory_budget_bytes(16.0) - 2 * memory_budget_bytes(8.0)) <= 1


def test_memory_grows_with_patch_and_batch():
    small = plan_topology([1.0, 1.0, 1.0], [32, 32, 32])
    large = plan_topology([1.0, 1.0, 1.0], [64, 64, 64])
    assert small.strides == large.strides[: len(small.strides)]

    def estimate(topology, batch):
        return training_memory_bytes(NetworkSpec("unet", 1, 2, topology.patch_size, topology.strides,
                                                 topology.kernel_sizes, topology.features), batch)

    assert estimate(small, 2) > estimate(small, 1)
    assert estimate(small, 4) - estimate(small, 2) == 2 * (estimate(small, 2) - estimate(small, 1))
    assert estimate(large, 2) > 4 * estimate(small, 2)  # 8x the voxels; parameters are shared
