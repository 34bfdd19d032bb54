"""find-best on a synthetic project: two configurations x 5 tiny folds."""
from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser

import pytest

from autoseg.contracts.postprocessing import load_postprocessing
from autoseg.errors import ConfigurationError
from autoseg.evaluation import find_best

from .project import DATASET, make_project

GOOD, NOISY = "3d_fullres__unet", "2d__unet"
ENSEMBLE = f"{NOISY} + {GOOD}"  # members in name order


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    return make_project(root, {GOOD: 0.45, NOISY: 0.55})


@pytest.fixture(scope="module")
def result(project):
    return find_best(DATASET, root=project, num_workers=1, print_summary=False)


def test_ranking_and_ensemble_decision(result, project):
    names = [name for name, _ in result.ranking]
    # independent errors of two similar models average out: the ensemble wins, then the less noisy model
    assert names == [ENSEMBLE, GOOD, NOISY]
    assert result.best == ENSEMBLE and result.members == [NOISY, GOOD]
    scores = dict(result.ranking)
    assert scores[ENSEMBLE] > scores[GOOD] > scores[NOISY]
    saved = json.loads((project / "results" / DATASET / "find_best.json").read_text())
    assert saved["best"]["name"] == result.best
    assert [entry["name"] for entry in saved["ranking"]] == names
    assert all(entry["num_cases"] == 10 for entry in saved["ranking"])  # all folds' validation cases merged


def test_commands_name_configuration_and_architecture(result):
    root = result.find_best_file.parents[2]
    assert result.commands == [
        f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER/{NOISY} -d {DATASET} -c 2d --arch unet -f 0 1 2 3 4 "
        f"--save-probabilities --root {root}",
        f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER/{GOOD} -d {DATASET} -c 3d_fullres --arch unet "
        f"-f 0 1 2 3 4 --save-probabilities --root {root}",
        # the planted blob makes a rule worth applying, so the ensemble command carries its rules file
        f"autoseg ensemble -i OUTPUT_FOLDER/{NOISY} OUTPUT_FOLDER/{GOOD} -o OUTPUT_FOLDER/ensemble "
        f"--postprocessing {result.postprocessing_file}",
    ]
    assert "predict new images with" in result.format()
    saved = json.loads(result.find_best_file.read_text())
    assert [m["configuration"] for m in saved["best"]["members"]] == ["2d", "3d_fullres"]


def test_postprocessing_removes_the_planted_blob(result):
    # Every model predicts a confident object-1 cube in a far corner: keeping the largest component helps.
    rules = load_postprocessing(result.postprocessing_file)
    assert rules == result.rules
    assert rules.foreground_largest_component or 1 in rules.largest_component_labels
    assert rules.dice_after["1"] > rules.dice_before["1"]
    # decided for the ensemble's output, so not written into a member's folder
    assert result.postprocessing_file.parent.name == f"{NOISY}--{GOOD}"
    assert not (result.find_best_file.parent / NOISY / "postprocessing.json").exists()


def test_report_is_self_contained_and_names_every_configuration(result):
    text = result.report.read_text()
    parser = _Collector()
    parser.feed(text)
    body = " ".join(parser.text)
    for name in (GOOD, NOISY, ENSEMBLE):
        assert name in body
    assert parser.external == []
    # box plot + 2 models' curves + worst/median/best overlays
    assert len(parser.images) == 6
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    pngs = {p.name for p in result.report.parent.glob("*.png")}
    assert {"dice_boxplot.png", "overlay_worst.png", "overlay_median.png", "overlay_best.png"} <= pngs
    assert f"curves_{GOOD}.png" in pngs


def test_missing_fold_is_named(project, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    shutil.rmtree(copy / "results" / DATASET / NOISY / "fold_3")
    (copy / "results" / DATASET / GOOD / "fold_2" / "validation" / "case_002.nii.gz").unlink()
    with pytest.raises(ConfigurationError) as info:
        find_best(DATASET, root=copy, num_workers=1, print_summary=False, report=False)
    message = str(info.value)
    assert "fold_3/validation" in message and NOISY in message
    assert "case_002" in message and GOOD in message
    with pytest.raises(ConfigurationError, match="fold_3"):
        find_best(DATASET, root=copy, configurations=[NOISY], num_workers=1, print_summary=False)


def test_quick_mode_uses_fold_zero_only(project, capsys):
    quick = find_best(DATASET, root=project, folds=(0,), configurations=[GOOD], num_workers=1, report=False)
    assert quick.ranking[0][0] == GOOD and len(quick.ranking) == 1
    saved = json.loads(quick.find_best_file.read_text())
    assert saved["ranking"][0]["num_cases"] == 2 and saved["folds"] == [0]
    assert "-f 0 " in quick.commands[0]
    assert quick.postprocessing_file == project / "results" / DATASET / GOOD / "postprocessing.json"
    assert "predict new images with" in capsys.readouterr().out
