"""The raw dataset: dataset.json, its cases, checking it (verify), converting MSD tasks, synthetic data."""
from autoseg.dataset.cases import Case, list_image_cases, list_training_cases
from autoseg.dataset.spec import DatasetSpec, load_dataset_spec, parse_dataset_spec

__all__ = ["Case", "DatasetSpec", "list_image_cases", "list_training_cases", "load_dataset_spec", "parse_dataset_spec"]
