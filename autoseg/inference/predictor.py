"""Load a trained model once, predict many images: the Python API behind `autoseg predict`.

A :class:`Predictor` holds one network per fold (built once, eval mode, on the chosen device), the plans and
the configuration they were trained with (taken from the checkpoint metadata, so a results folder is
self-contained), and the postprocessing rules `autoseg find-best` chose for it. ``predict_preprocessed`` runs
the sliding window per fold and averages the softmax over folds; ``predict_array``/``predict_files``/``predict``
add preprocessing, the mapping back onto the original grid and the postprocessing, as `autoseg predict` does.

Example::

    from autoseg.inference import Predictor
    predictor = Predictor.from_folder("Hippocampus", "3d_fullres", folds=[0, 1])   # or .from_bundle("model.zip")
    segmentation, geometry = predictor.predict("case_0000.nii.gz")
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from autoseg.contracts.checkpoint import FINAL, CheckpointMetadata, load_checkpoint
from autoseg.contracts.plans import Configuration, Plans, load_plans
from autoseg.device import choose_device, inference_amp_dtype
from autoseg.errors import (
    CheckpointError,
    ConfigurationError,
    ImageReadError,
    reraised_as,
)
from autoseg.inference.streaming import RESULT_RAM_BYTES, SpilledArray, stream_log_probabilities
from autoseg.io import Geometry, read_image
from autoseg.preprocessing.case import RESTORE_SLAB_BYTES, restore_segmentation_in_slabs

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = FINAL
# windows per forward pass: 2 keeps the activation memory at the training batch's order of magnitude while
# amortising per-call overhead on GPUs (nnU-Net predicts one window at a time)
DEFAULT_WINDOW_BATCH = 2


@dataclass(frozen=True)
class ModelIdentity:
    """What folds must share to be averaged (or exported) as one model."""

    configuration: str
    architecture: str
    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]

    @classmethod
    def of(cls, configuration: Configuration, metadata: CheckpointMetadata) -> "ModelIdentity":
        return cls(configuration.name, configuration.architecture.name, metadata.in_channels, metadata.num_classes,
                   tuple(configuration.patch_size))

    def describe(self) -> str:
        """``('3d_fullres', 'unet') with 1 channels/3 classes/patch (64, 64, 64)`` (the error messages' form)."""
        return (f"{(self.configuration, self.architecture)} with {self.in_channels} channels/{self.num_classes} "
                f"classes/patch {self.patch_size}")

    def describe_short(self) -> str:
        return (f"{(self.configuration, self.architecture)} with {self.in_channels}/{self.num_classes}/"
                f"{self.patch_size}")


@dataclass
class LoadedModel:
    """One fold: its network (eval mode, on the device) and where it came from."""

    network: nn.Module
    source: Path
    fold: Any


def build_network(
    configuration: Configuration, in_channels: int, num_classes: int, state_dict: dict[str, torch.Tensor], source: Path
) -> nn.Module:
    """Build the configuration's network and load ``state_dict``.

    Inference needs only the full-resolution output, so the network is built without deep supervision when
    its weights load that way (the plain U-Net keeps every head either way); otherwise with it, and
    :func:`sliding_window_predict` takes the first output.
    """
    from autoseg import networks

    spec = configuration.architecture
    errors = []
    for deep_supervision in (False, True):
        with reraised_as(ConfigurationError, networks.NetworkError):
            network_spec = replace(spec.network_spec(in_channels, num_classes), deep_supervision=deep_supervision)
            network = networks.build(network_spec)
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        return network
    raise CheckpointError(
        f"{source}: weights do not fit architecture '{spec.name}' of configuration '{configuration.name}' "
        f"({errors[-1][:200]}); the checkpoint belongs to another plan, retrain or pick the matching configuration"
    )


def _fold_of(path: Path) -> Any:
    match = re.fullmatch(r"fold_(\d+|all)", path.parent.name)
    if not match:
        return path.parent.name
    return int(match.group(1)) if match.group(1).isdigit() else match.group(1)


def find_fold_checkpoints(model_folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    """Checkpoint paths of the chosen folds in ``results/<D>/<config>__<arch>``.

    ``folds=None``: every ``fold_<k>`` folder holding ``checkpoint`` (numbered folds; ``fold_all`` only when
    there is no numbered one, as nnU-Net does).
    """
    if folds is None:
        found = sorted(
            (p for p in model_folder.glob(f"fold_*/{checkpoint}") if p.is_file()),
            key=lambda p: (not str(_fold_of(p)).isdigit(), str(_fold_of(p)).zfill(4)),
        )
        numbered = [p for p in found if isinstance(_fold_of(p), int)]
        found = numbered or found
        if not found:
            existing = sorted(p.name for p in model_folder.glob("fold_*")) if model_folder.is_dir() else []
            raise CheckpointError(
                f"{model_folder}: no fold_*/{checkpoint} found (fold folders: {', '.join(existing) or 'none'}); "
                "train a fold first, or pass --checkpoint checkpoint_best.pt / checkpoint_latest.pt"
            )
        return found
    paths = []
    for fold in folds:
        path = model_folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; fold {fold} is not trained (or not finished: try --checkpoint "
                "checkpoint_latest.pt), or leave out -f to use every trained fold"
            )
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- predictor
class Predictor:
    """Trained folds of one configuration, loaded once.

    Construct with :meth:`from_folder` (a trained dataset under the data root) or :meth:`from_checkpoints`.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        plans: Plans,
        configuration: Configuration,
        in_channels: int,
        device: torch.device | str = "auto",
        step_size: float = 0.5,
        mirror: bool = True,
        window_batch_size: int = DEFAULT_WINDOW_BATCH,
        sources: Sequence[Path] = (),
        mixed_precision: bool = True,
    ) -> None:
        if not networks:
            raise ConfigurationError("a Predictor needs at least one trained network (fold)")
        self.device = device if isinstance(device, torch.device) else choose_device(device)
        self.plans = plans
        self.configuration = configuration
        self.in_channels = int(in_channels)
        self.num_classes = plans.num_classes
        self.step_size = float(step_size)
        self.mirror = bool(mirror)
        self.window_batch_size = int(window_batch_size)
        self.amp = inference_amp_dtype(self.device, mixed_precision)
        # the [K, Z, Y, X] accumulators: float16 halves the largest arrays of a prediction (sliding_window.py
        # says why that stays precise); full precision (mixed_precision=False) keeps float32 throughout
        self.accumulator_dtype = torch.float16 if mixed_precision else torch.float32
        # float32 bytes of one slab of all classes when restoring to the original grid (restore_segmentation)
        self.restore_slab_bytes = RESTORE_SLAB_BYTES
        # network-grid results above this many bytes go to a temporary file in spill_directory (None: the system
        # temporary folder; autoseg predict uses its output folder): streaming.py
        self.result_ram_bytes = RESULT_RAM_BYTES
        self.spill_directory: Path | None = None
        self.sources = [Path(s) for s in sources]
        self.networks = [network.to(self.device).eval() for network in networks]
        # cascade (3d_cascade_fullres): the model of configuration.previous_stage, whose segmentation becomes
        # extra one-hot input channels; set by from_folder, or by hand when building from checkpoints
        self.previous_stage: Predictor | None = None
        # the largest-component rules find-best chose (autoseg.contracts.postprocessing.PostprocessingRules),
        # applied by predict/predict_array/predict_files/predict_segmentation and by `autoseg predict`; set by
        # from_folder and from_bundle, None = no postprocessing
        self.postprocessing: Any | None = None

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike],
        device: torch.device | str = "auto",
        step_size: float = 0.5,
        mirror: bool = True,
        window_batch_size: int = DEFAULT_WINDOW_BATCH,
        mixed_precision: bool = True,
    ) -> "Predictor":
        """One network per checkpoint file; all must share configuration, channels and classes.
        ``mixed_precision=False`` predicts in full fp32 (default: autocast where it is fast, see
        :func:`autoseg.device.inference_amp_dtype`)."""
        if not paths:
            raise CheckpointError("no checkpoint files given; pass at least one checkpoint_*.pt")
        networks, reference, plans, configuration = [], None, None, None
        for path in (Path(p) for p in paths):
            checkpoint = load_checkpoint(path, map_location="cpu")
            metadata = CheckpointMetadata.from_json(checkpoint["metadata"], path)
            try:
                this_configuration = metadata.parsed_configuration()
                this_plans = metadata.parsed_plans()
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"{path}: checkpoint metadata lacks a readable configuration/plans ({exc}); retrain this fold"
                ) from exc
            model = ModelIdentity.of(this_configuration, metadata)
            if reference is None:
                reference, plans, configuration = model, this_plans, this_configuration
            elif model != reference:
                raise CheckpointError(
                    f"{path}: belongs to {model.describe()}, but {paths[0]} is {reference.describe_short()}; "
                    "ensemble folds of one configuration only"
                )
            assert configuration is not None
            networks.append(
                build_network(configuration, reference.in_channels, metadata.num_classes, checkpoint["network"], path)
            )
            log.debug("loaded %s (epoch %s)", path, metadata.epoch)
        assert plans is not None and configuration is not None and reference is not None
        in_channels = reference.in_channels
        if reference.num_classes != plans.num_classes:
            raise CheckpointError(
                f"{paths[0]}: network has {reference.num_classes} classes but its plans list {plans.num_classes} "
                "labels; the checkpoint is inconsistent, retrain"
            )
        return cls(networks, plans, configuration, in_channels, device=device, step_size=step_size, mirror=mirror,
                   window_batch_size=window_batch_size, sources=[Path(p) for p in paths],
                   mixed_precision=mixed_precision)

    @classmethod
    def from_folder(
        cls,
        dataset: str | int,
        configuration: str,
        folds: Sequence[int | str] | None = None,
        root: str | os.PathLike | None = None,
        architecture: str | None = None,
        checkpoint: str = DEFAULT_CHECKPOINT,
        device: torch.device | str = "auto",
        step_size: float = 0.5,
        mirror: bool = True,
        window_batch_size: int = DEFAULT_WINDOW_BATCH,
        mixed_precision: bool = True,
        postprocess: bool = True,
    ) -> "Predictor":
        """The trained folds of ``configuration`` in ``results/<dataset>/<configuration>__<arch>/``, with the
        ``postprocessing.json`` find-best wrote there (``postprocess=False`` ignores it)."""
        folder = model_folder(dataset, configuration, root=root, architecture=architecture)
        paths = find_fold_checkpoints(folder, folds, checkpoint)
        log.info("model %s, folds %s", folder, ", ".join(str(_fold_of(p)) for p in paths))
        predictor = cls.from_checkpoints(paths, device=device, step_size=step_size, mirror=mirror,
                                         window_batch_size=window_batch_size, mixed_precision=mixed_precision)
        if postprocess:
            predictor.postprocessing = load_postprocessing_rules(folder)
        previous = predictor.configuration.previous_stage
        if previous:
            # the low-resolution stage uses all of its own trained folds (nnU-Net predicts it the same way), and
            # no postprocessing: the cascade was trained on its raw cross-validation predictions
            log.info("cascade: predicting %s first", previous)
            predictor.previous_stage = cls.from_folder(
                dataset, previous, folds=None, root=root, checkpoint=checkpoint, device=predictor.device,
                step_size=step_size, mirror=mirror, window_batch_size=window_batch_size,
                mixed_precision=mixed_precision, postprocess=False,
            )
        return predictor

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike,
        folds: Sequence[int | str] | None = None,
        device: torch.device | str = "auto",
        step_size: float = 0.5,
        mirror: bool = True,
        window_batch_size: int = DEFAULT_WINDOW_BATCH,
        mixed_precision: bool = True,
        postprocess: bool = True,
    ) -> "Predictor":
        """The model in a bundle written by ``autoseg export`` (:mod:`autoseg.inference.bundle`): no data root
        needed. ``folds``: a subset of the bundle's folds (default: all of them); ``postprocess=False``
        ignores the bundle's postprocessing.json. Raises CheckpointError for anything but a valid bundle."""
        from autoseg.inference.bundle import read_bundle

        bundle = read_bundle(path)
        manifest = bundle.manifest
        chosen = bundle.weights
        if folds is not None:
            wanted = [str(f) for f in folds]
            available = [str(fold.fold) for fold, _ in bundle.weights]
            missing = [f for f in wanted if f not in available]
            if missing:
                raise CheckpointError(
                    f"{path}: fold(s) {', '.join(missing)} are not in this bundle (it holds {', '.join(available)}); "
                    "pick from those or leave out -f"
                )
            chosen = [entry for entry in bundle.weights if str(entry[0].fold) in wanted]
        if manifest.num_classes != bundle.plans.num_classes:
            raise CheckpointError(
                f"{path}: the manifest says {manifest.num_classes} classes but plans.json lists "
                f"{bundle.plans.num_classes} labels; the bundle is inconsistent, export it again"
            )
        def stage(configuration: Configuration, in_channels: int, num_classes: int, weights: list) -> "Predictor":
            networks = [build_network(configuration, in_channels, num_classes, state_dict, Path(f"{path}:{fold.weights}"))
                        for fold, state_dict in weights]
            return cls(networks, bundle.plans, configuration, in_channels, device=device, step_size=step_size,
                       mirror=mirror, window_batch_size=window_batch_size, sources=[Path(path)],
                       mixed_precision=mixed_precision)

        log.info("model %s (%s, %s), folds %s", path, manifest.configuration, manifest.architecture,
                 ", ".join(str(fold.fold) for fold, _ in chosen))
        predictor = stage(bundle.configuration, manifest.in_channels, manifest.num_classes, chosen)
        if postprocess and bundle.postprocessing is not None:
            predictor.postprocessing = postprocessing_rules_from_json(bundle.postprocessing, f"{path}:postprocessing.json")
        if manifest.previous_stage is not None and bundle.previous_configuration is not None:
            # as from_folder: all of the previous stage's folds, no postprocessing (the cascade learnt from raw
            # cross-validation predictions)
            previous = manifest.previous_stage
            predictor.previous_stage = stage(bundle.previous_configuration, previous.in_channels,
                                             previous.num_classes, bundle.previous_weights)
        return predictor

    # ------------------------------------------------------------------------------------ prediction
    @property
    def model_dims(self) -> int:
        return int(self.configuration.dims)

    def predict_log_probabilities(self, data: np.ndarray | torch.Tensor) -> torch.Tensor | SpilledArray:
        """Log of the fold-averaged softmax, ``[K, Z, Y, X]`` on the CPU in :attr:`accumulator_dtype`
        (float16 unless built with ``mixed_precision=False``), for a preprocessed ``[C, Z, Y, X]`` array; above
        :attr:`result_ram_bytes` a :class:`~autoseg.inference.streaming.SpilledArray` read by rows.

        Log-probabilities rather than probabilities: they are what the restore interpolates
        (:func:`~autoseg.preprocessing.resampling.resample_probabilities` says why), and float16 keeps them to
        about 3 significant digits however unlikely a class is, where float16 probabilities would flush
        everything below 6e-8 to zero. Folds are combined as ``log(mean_f p_f) = logsumexp_f(log p_f) - log F``,
        row block by row block as each fold's rows leave its band buffer, in float32 on the device the fold
        runs on (:func:`~autoseg.inference.streaming.stream_log_probabilities`): no array of classes times the
        volume exists besides the result. Always at the planned patch size (fixed-size networks accept
        nothing else).
        """
        if data.ndim != 4 or data.shape[0] != self.in_channels:
            raise ValueError(
                f"preprocessed data must be [C={self.in_channels}, Z, Y, X], got shape {tuple(data.shape)}"
            )
        with torch.inference_mode():  # rows streamed, folds combined as they come: streaming.py
            return stream_log_probabilities(
                self.networks, data, self.configuration.patch_size, self.model_dims, self.num_classes,
                step_size=self.step_size, mirror=self.mirror, device=self.device, batch_size=self.window_batch_size,
                amp=self.amp, accumulator_dtype=self.accumulator_dtype, ram_bytes=self.result_ram_bytes,
                spill_directory=self.spill_directory)

    def predict_preprocessed(self, data: np.ndarray | torch.Tensor) -> np.ndarray:
        """Softmax probabilities float32 ``[K, Z, Y, X]`` for a preprocessed ``[C, Z, Y, X]`` array, averaged
        over folds: ``exp`` of :meth:`predict_log_probabilities` (a float32 array the size of the network
        grid times K; ``autoseg predict`` never makes it, see :meth:`restore_segmentation`)."""
        log_probabilities = self.predict_log_probabilities(data)
        probabilities = np.empty(tuple(log_probabilities.shape), dtype=np.float32)
        for start in range(probabilities.shape[1]):
            probabilities[:, start] = np.exp(np.asarray(log_probabilities[:, start], dtype=np.float32))
        return probabilities

    def check_image(self, image: np.ndarray, geometry: Geometry, name: str = "image") -> None:
        """Raise ImageReadError when ``image`` cannot go through this model (channels, dimensionality)."""
        expected = self.plans.num_channels
        if image.shape[0] != expected:
            names = ", ".join(f"{k}: {v}" for k, v in sorted(self.plans.channel_names.items()))
            raise ImageReadError(
                f"{name}: expected {expected} channel(s) ({names}), found {image.shape[0]}; give one "
                "<case>_<CCCC> file per channel (colour images: one file with that many colours)"
            )
        if geometry.dims == 2 and self.model_dims == 3:
            raise ImageReadError(
                f"{name}: is a 2D image but configuration '{self.configuration.name}' is a 3D model; "
                "predict 2D images with a 2D configuration (-c 2d) or give the 3D volume"
            )

    def preprocess(
        self, image: np.ndarray, geometry: Geometry, case_id: str = "", previous_segmentation: np.ndarray | None = None
    ) -> tuple[np.ndarray, Any]:
        """``(data [C', Z, Y, X], CaseProperties)`` through the training code path.

        Cascade configurations (``configuration.previous_stage``) get the previous stage's segmentation
        (original grid, ``[(Z,) Y, X]``; predicted here when not given) resampled like a label and appended as
        one one-hot channel per foreground label, so ``C' = C + num_classes - 1``.
        """
        preprocess_case, _, _ = preprocessing_functions()
        if not self.configuration.previous_stage:
            data, _, properties = preprocess_case(image, geometry, self.plans, self.configuration, case_id=case_id)
            return data, properties
        if previous_segmentation is None:
            if self.previous_stage is None:
                raise ConfigurationError(
                    f"configuration '{self.configuration.name}' is a cascade stage after "
                    f"'{self.configuration.previous_stage}', but no model of that stage is loaded; load with "
                    "Predictor.from_folder or set predictor.previous_stage"
                )
            previous_segmentation = self.previous_stage.predict_segmentation(image, geometry)
        data, label, properties = preprocess_case(
            image, geometry, self.plans, self.configuration, label=previous_segmentation, case_id=case_id
        )
        return np.concatenate([data, foreground_one_hot(label[0], self.num_classes)], axis=0), properties

    def restore(self, probabilities: np.ndarray, properties: Any) -> np.ndarray:
        """Probabilities ``[K, Z, Y, X]`` of the preprocessed grid -> float32 ``[K, *original shape]``."""
        _, restore_probabilities, _ = preprocessing_functions()
        return restore_probabilities(probabilities, properties, self.configuration)

    def restore_segmentation(
        self, log_probabilities: np.ndarray | torch.Tensor, properties: Any, probabilities: np.ndarray | None = None
    ) -> np.ndarray:
        """Log-probabilities ``[K, Z, Y, X]`` of the preprocessed grid -> label map on the original grid, slab by
        slab (:func:`autoseg.preprocessing.case.restore_segmentation_in_slabs`): memory stays at a few slabs
        of K channels. ``probabilities``: an optional ``[K, *original shape]`` array (e.g. a float16 memory
        map) to receive the softmax on the original grid."""
        if isinstance(log_probabilities, torch.Tensor):
            log_probabilities = log_probabilities.numpy()
        return restore_segmentation_in_slabs(log_probabilities, properties, self.configuration, probabilities,
                                             slab_bytes=self.restore_slab_bytes)

    def postprocess(self, segmentation: np.ndarray) -> np.ndarray:
        """Apply :attr:`postprocessing` (find-best's largest-component rules) to a label map on the original
        grid; unchanged when there are none. The one place both the CLI and the Python API do it."""
        if self.postprocessing is None:
            return segmentation
        from autoseg.contracts.postprocessing import apply_postprocessing

        return apply_postprocessing(segmentation, self.postprocessing)

    def predict_segmentation(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The label map ``[*geometry.shape]`` of a raw image ``[C, (Z,) Y, X]``, postprocessed, with the memory
        of ``autoseg predict`` (no float32 probabilities on either grid); a cascade's previous stage uses it."""
        self.check_image(image, geometry)
        data, properties = self.preprocess(image, geometry)
        log_probabilities = self.predict_log_probabilities(data)
        del data
        return self.postprocess(self.restore_segmentation(log_probabilities, properties))

    def predict_array(
        self,
        image: np.ndarray,
        geometry: Geometry | None = None,
        previous_segmentation: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(segmentation [*geometry.shape] uint8/uint16, probabilities float32 [K, *geometry.shape])`` for a raw
        image ``[C, (Z,) Y, X]`` with its geometry (as returned by ``autoseg.io.read_image``), or with only its
        ``spacing`` (array axis order, mm; see :func:`array_geometry`). The segmentation is postprocessed, the
        probabilities are the network's. ``previous_segmentation``: cascade only, the previous stage's result
        on the same grid."""
        geometry = self._geometry_for(image, geometry, spacing)
        self.check_image(image, geometry)
        data, properties = self.preprocess(image, geometry, previous_segmentation=previous_segmentation)
        probabilities = self.restore(self.predict_preprocessed(data), properties)
        return self.postprocess(probabilities_to_segmentation(probabilities)), probabilities

    def predict_files(self, files: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """Read a case's channel files and predict: ``(segmentation, probabilities, geometry)``."""
        image, geometry = read_image(files)
        first = files if isinstance(files, (str, os.PathLike)) else files[0]
        self.check_image(image, geometry, name=str(first))
        segmentation, probabilities = self.predict_array(image, geometry)
        return segmentation, probabilities, geometry

    def predict(
        self,
        image: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
        spacing: Sequence[float] | None = None,
        geometry: Geometry | None = None,
    ) -> tuple[np.ndarray, Geometry]:
        """``(segmentation, geometry)`` for one case, the way `autoseg predict` makes it (memory-bounded,
        postprocessed), without probabilities.

        ``image``: a file, a list of channel files (``_0000``, ``_0001``, ...), or an array ``[C, (Z,) Y, X]``
        (a single-channel ``[(Z,) Y, X]`` array when the model has one channel and ``geometry``/``spacing``
        say how many axes it has). For an array give its ``geometry``, or only its ``spacing`` (mm, array axis
        order): identity direction and zero origin are assumed.
        """
        if isinstance(image, np.ndarray):
            array = np.asarray(image, dtype=np.float32)
            dims = len(geometry.shape) if geometry is not None else len(spacing) if spacing is not None else None
            if dims is not None and array.ndim == dims and self.in_channels == 1:
                array = array[None]  # one channel given without its channel axis
            geometry = self._geometry_for(array, geometry, spacing)
            name = "array"
        else:
            if spacing is not None or geometry is not None:
                raise ConfigurationError(
                    f"{image}: spacing/geometry are for arrays; a file carries its own geometry, pass the path alone"
                )
            array, geometry = read_image(image)
            name = str(image if isinstance(image, (str, os.PathLike)) else image[0])
        self.check_image(array, geometry, name=name)
        return self.predict_segmentation(array, geometry), geometry

    @staticmethod
    def _geometry_for(image: np.ndarray, geometry: Geometry | None, spacing: Sequence[float] | None) -> Geometry:
        if geometry is not None:
            if spacing is not None:
                raise ConfigurationError("give either geometry or spacing for an array, not both")
            return geometry
        if spacing is None:
            raise ConfigurationError(
                f"an image array {tuple(image.shape)} needs its voxel spacing: pass spacing=(z, y, x) in mm "
                "(or geometry=, e.g. from autoseg.io.read_image)"
            )
        return array_geometry(image, spacing)


def array_geometry(image: np.ndarray, spacing: Sequence[float]) -> Geometry:
    """The geometry of an array ``[C, (Z,) Y, X]`` known only by its ``spacing`` (mm, array axis order):
    identity direction and zero origin, which is what a segmentation written with it will carry."""
    dims = image.ndim - 1
    if len(spacing) != dims or dims not in (2, 3):
        raise ConfigurationError(
            f"image array of shape {tuple(image.shape)} is [C, {'Z, ' if dims == 3 else ''}Y, X] with {dims} "
            f"spatial axes, but spacing {tuple(spacing)} has {len(spacing)}; give one spacing per spatial axis "
            "(a single-channel array needs a leading channel axis: image[None])"
        )
    if any(not float(s) > 0 for s in spacing):
        raise ConfigurationError(f"spacing {tuple(spacing)}: every voxel size must be a positive number of mm")
    return Geometry(
        shape=tuple(int(v) for v in image.shape[1:]),
        spacing=tuple(float(v) for v in spacing),
        origin=(0.0,) * dims,
        direction=tuple(float(v) for v in np.eye(dims).ravel()),
    )


def load_postprocessing_rules(model_folder: Path) -> Any | None:
    """The rules find-best wrote into ``model_folder/postprocessing.json``, or None when there are none."""
    from autoseg.contracts.postprocessing import load_postprocessing

    rules = load_postprocessing(model_folder)
    if rules is not None:
        log.info("postprocessing from %s: %s", model_folder / "postprocessing.json", rules.describe())
    return rules


def postprocessing_rules_from_json(data: dict[str, Any], source: str) -> Any:
    """Rules from the JSON of a postprocessing.json (as a bundle holds it)."""
    from autoseg.contracts.postprocessing import PostprocessingRules

    return PostprocessingRules.from_json(data, source)


def foreground_one_hot(segmentation: np.ndarray, num_classes: int) -> np.ndarray:
    """``[Z, Y, X]`` label map -> float32 ``[num_classes - 1, Z, Y, X]``, channel ``k - 1`` = (label == k).

    The cascade's extra inputs: background gets no channel (nnU-Net's convention for the previous stage).
    """
    labels = np.arange(1, num_classes).reshape((-1,) + (1,) * segmentation.ndim)
    return (segmentation[None] == labels).astype(np.float32)


def probabilities_to_segmentation(probabilities: np.ndarray) -> np.ndarray:
    """Argmax over classes: ``[K, ...]`` -> ``[...]`` label map (uint8 for < 256 classes)."""
    dtype = np.uint8 if probabilities.shape[0] < 256 else np.uint16  # as segmentation_dtype in the restore
    return np.argmax(probabilities, axis=0).astype(dtype)


def preprocessing_functions() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """``(preprocess_case, restore_probabilities, restore_segmentation)`` from the preprocessing package,
    imported on first use (docs/internals.md, "Preprocessing")."""
    try:
        from autoseg.preprocessing import preprocess_case, restore_probabilities, restore_segmentation
    except ImportError as exc:  # pragma: no cover - only while the preprocessing package is incomplete
        raise ConfigurationError(
            f"autoseg.preprocessing is not available ({exc}); reinstall autoseg (pip install -e .)"
        ) from exc
    return preprocess_case, restore_probabilities, restore_segmentation


def model_folder(
    dataset: str | int, configuration: str, root: str | os.PathLike | None = None, architecture: str | None = None
) -> Path:
    """``results/<dataset>/<configuration>__<arch>``; the architecture comes from plans.json or, without it,
    from the one trained folder whose name starts with the configuration."""
    from autoseg.paths import resolve_dataset, results_folder

    location = resolve_dataset(dataset, root)
    if architecture is None:
        plans_file = location.preprocessed / "plans.json"
        if plans_file.is_file():
            try:
                architecture = load_plans(plans_file).configuration(configuration).architecture.name
            except ConfigurationError:
                architecture = None
    if architecture is None:
        candidates = sorted(location.results.glob(f"{configuration}__*")) if location.results.is_dir() else []
        if len(candidates) != 1:
            found = ", ".join(p.name for p in sorted(location.results.glob("*__*"))) if location.results.is_dir() else ""
            raise CheckpointError(
                f"{location.results}: expected one trained model folder '{configuration}__<arch>', found "
                f"{found or 'none'}; train it first or pass --arch"
            )
        return candidates[0]
    folder = results_folder(location, configuration, architecture)
    if not folder.is_dir():
        found = ", ".join(p.name for p in sorted(location.results.glob("*__*"))) if location.results.is_dir() else ""
        raise CheckpointError(
            f"{folder}: no trained model (trained: {found or 'none'}); run `autoseg train {location.name} "
            f"{configuration} 0` first or choose another -c/--arch"
        )
    return folder
