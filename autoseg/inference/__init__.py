"""Inference: sliding window, the Predictor (Python API), `autoseg predict` and `autoseg ensemble`.

Public: :class:`Predictor`, :func:`predict`, :class:`PredictReport`, :func:`ensemble_folders`.
Numerics (Gaussian map, tiling) live in :mod:`autoseg.inference.sliding_window`.
"""
from autoseg.inference.ensemble import ensemble_folders
from autoseg.inference.predict import PredictReport, predict
from autoseg.inference.predictor import Predictor

__all__ = ["PredictReport", "Predictor", "ensemble_folders", "predict"]
