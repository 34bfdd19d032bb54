"""LabelScheme (autoseg/dataset/labels.py) on hand-made arrays, and every invalid label form of dataset.json
named by a one-line DatasetError."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.dataset.labels import SIGMOID, SOFTMAX, LabelScheme
from autoseg.dataset.spec import parse_dataset_spec
from autoseg.errors import DatasetError

BRATS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
BASE = {"channel_names": {"0": "T1"}, "file_ending": ".nii.gz"}


def brats() -> LabelScheme:
    return LabelScheme.from_labels(BRATS, [1, 2, 3])


def test_region_scheme_properties() -> None:
    scheme = brats()
    assert scheme.has_regions and scheme.ignore_value is None
    assert scheme.num_outputs == 3 and scheme.output_activation == SIGMOID
    assert scheme.output_names == ["whole", "core", "enhancing"]
    assert scheme.regions == [("whole", (1, 2, 3)), ("core", (2, 3)), ("enhancing", (3,))]
    assert scheme.evaluation_units() == scheme.regions
    assert scheme.label_values == [0, 1, 2, 3] and scheme.foreground_values == [1, 2, 3]


def test_plain_and_ignore_scheme_properties() -> None:
    scheme = LabelScheme.from_labels({"background": 0, "ignore": 3, "liver": 1, "tumour": 2})
    assert not scheme.has_regions and scheme.ignore_value == 3
    assert scheme.num_outputs == 3 and scheme.output_activation == SOFTMAX  # ignore is no output
    assert scheme.output_names == ["background", "liver", "tumour"]
    assert scheme.evaluation_units() == [("liver", (1,)), ("tumour", (2,))]
    assert scheme.label_values == [0, 1, 2, 3] and scheme.foreground_values == [1, 2]


def test_region_masks_and_paint_invert_each_other_on_nested_regions() -> None:
    scheme = brats()
    seg = np.array([[0, 1, 2], [3, 2, 1]])
    masks = scheme.to_region_masks(seg)
    assert masks.shape == (3, 2, 3) and masks.dtype == bool
    assert masks[0].tolist() == [[False, True, True], [True, True, True]]  # whole: 1, 2, 3
    assert masks[1].tolist() == [[False, False, True], [True, True, False]]  # core: 2, 3
    assert masks[2].tolist() == [[False, False, False], [True, False, False]]  # enhancing: 3
    assert np.array_equal(scheme.paint(masks), seg)


def test_paint_thresholds_probabilities_and_later_regions_overwrite() -> None:
    scheme = brats()
    probabilities = np.array([[0.9, 0.9, 0.4, 0.5], [0.2, 0.7, 0.9, 0.9], [0.1, 0.6, 0.1, 0.9]], dtype=np.float32)
    # voxel 2: core without whole still paints 2 (order, not nesting, decides); voxel 3: 0.5 is not > 0.5
    assert scheme.paint(probabilities).tolist() == [1, 3, 2, 3]
    assert scheme.paint(probabilities, threshold=0.8).tolist() == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="expected 3 output channels"):
        scheme.paint(probabilities[:2])


def test_plain_paint_is_argmax_over_class_values_and_region_masks_refuse_plain() -> None:
    scheme = LabelScheme.from_labels({"background": 0, "a": 1, "b": 2, "ignore": 3})
    scores = np.array([[0.1, 0.8, 0.3], [0.7, 0.1, 0.3], [0.2, 0.1, 0.4]])
    assert scheme.paint(scores).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="region scheme"):
        scheme.to_region_masks(np.zeros(3, int))


def test_annotated_mask() -> None:
    seg = np.array([0, 1, 3, 2, 3])
    assert LabelScheme.from_labels({"background": 0, "a": 1, "b": 2, "ignore": 3}).annotated_mask(seg).tolist() == \
        [True, True, False, True, False]
    assert brats().annotated_mask(seg).all()


def test_json_round_trip_survives_sorted_keys() -> None:
    # plans.json is written with sorted keys: the scheme must not depend on object key order
    scheme = brats()
    text = json.dumps(scheme.to_json(), sort_keys=True)
    again = LabelScheme.from_json(json.loads(text))
    assert again == scheme and again.output_names == ["whole", "core", "enhancing"]
    plain = LabelScheme.from_labels({"background": 0, "a": 1, "ignore": 2})
    assert LabelScheme.from_json(json.loads(json.dumps(plain.to_json(), sort_keys=True))) == plain


def test_label_order_restores_region_order_of_a_sorted_dict() -> None:
    shuffled = dict(sorted(BRATS.items()))  # background, core, enhancing, whole
    assert LabelScheme.from_labels(shuffled, [1, 2, 3], label_order=list(BRATS)) == brats()
    with pytest.raises(ValueError, match="does not name the labels"):
        LabelScheme.from_labels(shuffled, [1, 2, 3], label_order=["background", "whole"])


def test_valid_region_and_ignore_datasets_parse() -> None:
    spec = parse_dataset_spec({**BASE, "labels": BRATS, "regions_class_order": [1, 2, 3]})
    assert spec.label_scheme == brats() and spec.num_classes == 3 and "regions_class_order" not in spec.extra
    assert spec.to_json()["labels"] == BRATS and list(spec.to_json()["labels"]) == list(BRATS)
    spec = parse_dataset_spec({**BASE, "labels": {"background": 0, "a": 1, "ignore": 2}})
    assert spec.label_scheme.ignore_value == 2 and spec.num_classes == 2 and spec.label_values == [0, 1, 2]
    spec = parse_dataset_spec({**BASE, "labels": {"background": 0, "w": [1, 2], "c": 2, "ignore": 3},
                               "regions_class_order": [1, 2]})
    assert spec.label_scheme.ignore_value == 3 and spec.num_classes == 2


@pytest.mark.parametrize("labels, order, message", [
    ({"background": 0, "whole": [1, 2, 3], "core": [2, 3]}, None, "'regions_class_order' is required"),
    ({"background": 0, "whole": [1, 2, 3], "core": [2, 3]}, [1], "has 1 entries but there are 2 regions"),
    ({"background": 0, "whole": [1, 2, 3], "core": [2, 3]}, [1, 5], "names value(s) [5], which are in no region"),
    ({"background": 0, "a": 1}, [1], "no label is a region"),
    ({"background": 0, "a": 1, "ignore": 5}, None, "label 'ignore' has value 5; it must be the highest value, 2"),
    ({"background": 0, "a": 1, "b": 1}, None, "two labels share the value(s) [1]"),
    ({"background": 0, "w": [1, 2], "ignore": 2}, [1], "region 'w' contains the ignore value 2"),
    ({"background": 0, "w": [1, 2, 2]}, [1], "region 'w' lists value(s) [2] more than once"),
    ({"background": 0, "w": [1, 4]}, [1], "value(s) [2, 3] are never declared"),
    ({"background": 0, "w": [0, 1]}, [1], "contains background 0"),
    ({"background": 0, "w": []}, [1], "non-empty list of integer"),
    ({"background": 0, "a": 1, "ignore": [2]}, None, "'ignore' must be one integer"),
])
def test_each_invalid_label_form_is_one_line_naming_the_file(labels: dict, order: list | None, message: str) -> None:
    data = {**BASE, "labels": labels}
    if order is not None:
        data["regions_class_order"] = order
    with pytest.raises(DatasetError) as error:
        parse_dataset_spec(data, "/data/Dataset001_X/dataset.json")
    text = str(error.value)
    assert message in text and text.startswith("/data/Dataset001_X/dataset.json: ") and "\n" not in text
