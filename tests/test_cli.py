"""The command line: help everywhere, user errors as one line with exit 1, --debug shows the traceback."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.cli import build_parser, main
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.errors import DatasetError

EXPECTED_COMMANDS = {"verify", "convert-msd", "plan", "preprocess", "train", "predict", "ensemble", "evaluate",
                     "find-best", "demo", "info"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_design_command_exists() -> None:
    assert EXPECTED_COMMANDS <= set(_subcommands())


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in EXPECTED_COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", sorted(EXPECTED_COMMANDS))
def test_every_subcommand_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: autoseg {command}" in out and "--root" in out and "--debug" in out
    # every option explains itself, and no empty "(default: None)" / "(default: False)" noise
    assert "(default: None)" not in out and "(default: False)" not in out
    subparser = _subcommands()[command]
    undocumented = [a.dest for a in subparser._actions if not a.help and a.dest != "help"]
    assert not undocumented, f"autoseg {command}: options without help text: {undocumented}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: autoseg" in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "NoSuchDataset", "--root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoseg verify: error: no dataset called 'NoSuchDataset'")
    assert "Traceback" not in captured.err


def test_debug_raises_instead_of_printing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="NoSuchDataset"):
        main(["verify", "NoSuchDataset", "--root", str(tmp_path), "--debug"])


def test_debug_shows_traceback_from_the_installed_program(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOSEG_HOME", "nnUNet_raw")}
    plain = subprocess.run([sys.executable, "-m", "autoseg", "verify", "77", "--root", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=60)
    debug = subprocess.run([sys.executable, "-m", "autoseg", "verify", "77", "--root", str(tmp_path), "--debug"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DatasetError" in debug.stderr


def test_verify_by_number_under_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path / "raw" / "Dataset042_Tiny", SyntheticSpec(num_cases=2, shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0)))
    assert main(["verify", "42", "--root", str(tmp_path), "-np", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("Dataset042_Tiny: OK (2 training cases, 0 test cases, no problems)")
    (tmp_path / "raw" / "Dataset042_Tiny" / "labelsTr" / "case_001.nii.gz").unlink()
    assert main(["verify", "Tiny", "--root", str(tmp_path), "-np", "1"]) == 1


def test_common_options_work_before_and_after_the_command(tmp_path, capsys):
    from autoseg.cli import main

    with pytest.raises(Exception) as raised:  # --debug before the command re-raises the user error
        main(["--debug", "--root", str(tmp_path), "verify", "nothing_here"])
    assert "nothing_here" in str(raised.value) and str(tmp_path) in str(raised.value)
    assert main(["verify", "nothing_here", "--root", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err
