import numpy as np
import pytest

from autoseg.planning.spacing import median_shape_at_spacing, shape_at_spacing, target_spacing
from autoseg.planning.topology import features_per_stage, plan_topology


def test_isotropic_target_is_the_median():
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 0.9, 1.1], [0.8, 1.1, 1.3]])
    shapes = np.array([[50, 50, 50]] * 3)
    assert np.allclose(target_spacing(spacings, shapes), [1.0, 1.0, 1.1])


def test_thick_slices_with_few_voxels_take_the_10th_percentile():
    z = np.linspace(4.0, 6.0, 11)  # 10th percentile = 4.2
    spacings = np.stack([z, np.full(11, 0.8), np.full(11, 0.8)], axis=1)
    shapes = np.array([[14, 96, 96]] * 11)
    target = target_spacing(spacings, shapes)
    assert target[0] == pytest.approx(4.2)
    assert target[1:] == pytest.approx([0.8, 0.8])


def test_thick_slices_with_many_voxels_keep_the_median():
    # 5 mm slices but 200 of them: not "few voxels", so the median stays (nnunet.md, two-condition rule)
    z = np.linspace(4.0, 6.0, 11)
    spacings = np.stack([z, np.full(11, 0.8), np.full(11, 0.8)], axis=1)
    shapes = np.array([[200, 96, 96]] * 11)
    assert target_spacing(spacings, shapes)[0] == pytest.approx(5.0)


def test_percentile_is_floored_at_the_other_axes():
    # the coarse axis is the last one here: median (0.6, 1.0, 4.0), 4.0 > 3 x 0.6 and 10 x 3 < 100 slices
    spacings = np.array([[0.6, 1.0, 0.7]] * 5 + [[0.6, 1.0, 4.0]] * 6)
    shapes = np.array([[100, 100, 10]] * 11)
    # the 10th percentile (0.7) is finer than the largest other axis (1.0): floored at 1.0 + 1e-5
    target = target_spacing(spacings, shapes)
    assert target[2] == pytest.approx(1.0 + 1e-5)


def test_shapes_at_spacing_keep_the_physical_extent():
    assert shape_at_spacing([10, 100], [5.0, 1.0], [2.5, 2.0]).tolist() == [20, 50]
    med = median_shape_at_spacing(np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([[10, 10], [10, 20]]), [1.0, 1.0])
    assert med.tolist() == [15.0, 25.0]  # (10, 10) and (20, 40)


def test_topology_of_an_anisotropic_mri_matches_nnunet():
    # oracle Dataset970: spacing (1.92, 0.81, 0.80), median shape (40.5, 53, 47.5) -> patch 44x56x48
    topology = plan_topology([1.9247, 0.8095, 0.7985], [40.5, 53.0, 47.5])
    assert topology.patch_size == (44, 56, 48)
    assert [list(s) for s in topology.strides] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert [list(k) for k in topology.kernel_sizes] == [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert topology.features == (32, 64, 128, 256)
    assert topology.pooling_per_axis() == (2, 3, 3)
    assert topology.divisor == (4, 8, 8)


def test_topology_of_thick_slices_pools_in_plane_first():
    # oracle Dataset972: 4.6 mm slices, 16 of them
    topology = plan_topology([4.61, 0.79, 0.83], [16.0, 89.0, 90.0])
    assert [list(s) for s in topology.strides] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert [list(k) for k in topology.kernel_sizes][:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert topology.patch_size == (16, 96, 96)


def test_features_are_capped():
    assert features_per_stage(7, 3) == [32, 64, 128, 256, 320, 320, 320]
    assert features_per_stage(7, 2) == [32, 64, 128, 256, 512, 512, 512]


def test_tiny_axis_is_never_pooled():
    topology = plan_topology([1.0, 1.0], [6.0, 64.0])  # 6 < 2 x 4: the first axis cannot be halved
    assert topology.pooling_per_axis()[0] == 0
    assert topology.patch_size[0] == 6
