"""Tiny topologies shared by the network tests (milliseconds on CPU)."""

# anisotropic 3D plan shaped like nnU-Net's SynthMR 3d_fullres (first axis pooled later, kernel 1 on it first)
TINY_3D = dict(
    patch_size=(8, 16, 12),
    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    features=[4, 8, 16],
)
TINY_2D = dict(
    patch_size=(16, 8),
    strides=[[1, 1], [2, 1], [2, 2]],
    kernel_sizes=[[3, 3], [3, 1], [3, 3]],
    features=[4, 8, 16],
)
