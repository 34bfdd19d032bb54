"""One run per fold folder (issue 18.4, 18.5, 18.7) and names from JSON kept inside the data root (18.6)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.contracts.checkpoint import load_checkpoint
from autoseg.errors import BusyError, ConfigurationError, TrainingError, TrainingInterrupted
from autoseg.training import train

from .tiny_data import DATASET, build_tiny_dataset

FAST = dict(num_workers=0, validate=False, device="cpu", validation_iterations=1)
SHORT = dict(epochs=1, iterations_per_epoch=1)


def fold_path(root, fold=0):
    return root / "results" / DATASET / "2d__unet" / f"fold_{fold}"


def starts(folder):
    return (folder / "log.txt").read_text().count("training Dataset990_Tiny 2d")


@pytest.fixture()
def tiny(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    return tmp_path


def test_finished_fold_is_refused_and_force_starts_over_cleanly(tiny):
    folder = train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    (folder / "validation").mkdir()
    (folder / "validation" / "case_000.nii.gz").write_bytes(b"old")
    (folder / "my_notes.txt").write_text("mine")
    final = (folder / "checkpoint_final.pt").read_bytes()
    with pytest.raises(TrainingError) as refused:
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    message = str(refused.value)
    assert "fold_0 is already trained (checkpoint_final.pt, " in message and "--continue" in message
    assert "--force" in message and "\n" not in message
    assert (folder / "checkpoint_final.pt").read_bytes() == final and starts(folder) == 1  # nothing touched

    train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST, force=True)
    assert starts(folder) == 1  # the old log went with the old run: the two runs do not mix
    assert "--force: removed the earlier run's checkpoint_latest.pt, checkpoint_best.pt, checkpoint_final.pt" in (
        folder / "log.txt").read_text()
    assert not (folder / "validation").exists()  # old predictions never sit beside new weights
    assert (folder / "my_notes.txt").read_text() == "mine"  # only autoseg's own files are removed
    with pytest.raises(ConfigurationError, match="--force .* and --continue .* contradict"):
        train(DATASET, "2d", 0, root=tiny, **FAST, force=True, continue_training=True)


def test_interrupted_fold_without_continue_is_refused(tiny):
    folder = train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    (folder / "checkpoint_final.pt").unlink()  # as if killed before the end
    with pytest.raises(TrainingError, match=r"fold_0 has an interrupted run \(checkpoint_latest.pt, .*add --continue "
                       r"to resume it \(`autoseg train Dataset990_Tiny 2d 0 --root .* --continue`\)"):
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)


def test_continue_before_any_checkpoint_restarts_the_run_with_its_options(tiny):
    """Issue 18.5a/c: a run killed before its first checkpoint was resumed 'from scratch' with the 1000 x 250
    defaults; now run.json (written at the start) gives its options back."""
    def stop(epoch, curves):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as interrupted:
        train(DATASET, "2d", 0, root=tiny, epochs=3, iterations_per_epoch=2, seed=5, **FAST,
              checkpoint_every=100, on_epoch_end=stop)
    message = str(interrupted.value)
    assert "before a resumable checkpoint was saved" in message and "is saved" not in message
    folder = fold_path(tiny)
    assert not (folder / "checkpoint_latest.pt").exists() and (folder / "checkpoint_best.pt").exists()
    run = json.loads((folder / "run.json").read_text())
    assert (run["epochs"], run["iterations_per_epoch"], run["seed"]) == (3, 2, 5)

    with pytest.raises(ConfigurationError, match=r"run.json: --seed 6 differs from the run being continued "
                       r"\(--seed 5\); drop --seed"):
        train(DATASET, "2d", 0, root=tiny, seed=6, continue_training=True, **FAST)
    train(DATASET, "2d", 0, root=tiny, continue_training=True, **FAST)
    log_text = (folder / "log.txt").read_text()
    assert "saved no checkpoint before it stopped; restarting that run" in log_text and starts(folder) == 1
    metadata = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    assert (metadata["epoch"], metadata["iterations_per_epoch"], metadata["seed"]) == (3, 2, 5)


def test_earlier_start_without_checkpoints_is_cleared_not_mixed(tiny):
    def stop(epoch, curves):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST, checkpoint_every=100, on_epoch_end=stop)
    folder = fold_path(tiny)
    with pytest.raises(TrainingError, match=r"fold_0 holds an earlier run that saved only checkpoint_best.pt \("):
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    (folder / "checkpoint_best.pt").unlink()  # now: run.json, log.txt, ... and no checkpoint at all
    train(DATASET, "2d", 0, root=tiny, epochs=2, iterations_per_epoch=1, **FAST)
    log_text = (folder / "log.txt").read_text()
    assert "no checkpoint was saved: removed the earlier run's log.txt, training_log.json" in log_text
    assert starts(folder) == 1
    assert json.loads((folder / "run.json").read_text())["epochs"] == 2


def test_continue_with_nothing_to_resume_says_so(tiny):
    train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST, continue_training=True)
    assert "--continue: nothing to resume in" in (fold_path(tiny) / "log.txt").read_text()


def test_continue_may_extend_the_schedule(tiny):
    train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    train(DATASET, "2d", 0, root=tiny, epochs=2, continue_training=True, **FAST)
    folder = fold_path(tiny)
    assert "extending the run with --epochs 2 (the run had --epochs 1)" in (folder / "log.txt").read_text()
    assert load_checkpoint(folder / "checkpoint_final.pt")["metadata"]["epoch"] == 2
    assert json.loads((folder / "run.json").read_text())["epochs"] == 2


HOLDER = """
import sys
from autoseg.locks import fold_lock
with fold_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_training_of_a_fold_is_refused(tiny):
    """Issue 18.7: two trainings of one fold both ran, interleaving one log; the second is now refused."""
    folder = fold_path(tiny)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"fold_0 is being trained by pid {other.pid} on host .* since "):
            train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
        assert not (folder / "log.txt").exists() and not (folder / "run.json").exists()
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)  # free again once the other process ended


def _edit_plans(root, edit):
    path = root / "preprocessed" / DATASET / "plans.json"
    plans = json.loads(path.read_text())
    edit(plans)
    path.write_text(json.dumps(plans))


def test_configuration_name_with_parent_steps_is_refused(tiny):
    """Issue 18.6: a configuration named '../../x' made train write its fold folder outside the data root."""
    def rename(plans):
        plans["configurations"]["../../escape"] = dict(plans["configurations"]["2d"], name="../../escape")

    _edit_plans(tiny, rename)
    with pytest.raises(ConfigurationError, match=r"plans.json: configuration name '../../escape' is not a valid "
                       r"name: expected letters, digits, _ - . \+ only"):
        train(DATASET, "../../escape", 0, root=tiny, **SHORT, **FAST)
    assert not (tiny / "results" / "escape__unet").exists() and not (tiny / "escape__unet").exists()


def test_absolute_data_identifier_is_refused(tiny, tmp_path_factory):
    """Issue 18.6: a data_identifier that is an absolute path made stages read and write there."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")

    def point_away(plans):
        plans["configurations"]["2d"]["data_identifier"] = str(elsewhere)

    _edit_plans(tiny, point_away)
    with pytest.raises(ConfigurationError, match=r"configurations\['2d'\].data_identifier '/.*' is not a valid name"):
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    assert list(elsewhere.iterdir()) == []


def test_case_id_with_a_path_in_splits_is_refused(tiny):
    path = tiny / "preprocessed" / DATASET / "splits.json"
    splits = json.loads(path.read_text())
    splits[0]["val"].append("../../../outside")
    path.write_text(json.dumps(splits))
    with pytest.raises(ConfigurationError, match=r"splits.json: fold 0 val case id '../../../outside' is not a valid"):
        train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)


def test_epoch_summary_goes_to_stdout(tiny, capsys):
    """Issue 18.10: every line went to stderr; the per-epoch summary is the command's output (stdout)."""
    train(DATASET, "2d", 0, root=tiny, epochs=2, iterations_per_epoch=1, **FAST)
    captured = capsys.readouterr()
    assert [line.split("  ")[0] for line in captured.out.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    assert "epoch 1/2" not in captured.err  # not a TTY: no progress bar either
    assert (fold_path(tiny) / "log.txt").read_text().count("epoch 2/2  train") == 1


def test_long_cpu_run_duration_warning():
    from autoseg.training.progress import duration_warning

    assert duration_warning(2.6, 1000 * 250) == ("at 2.6 s/iteration this run takes ~7.5 days on CPU; use "
                                                 "--time-budget 12h or a GPU")
    assert duration_warning(2.6, 5000) == "at 2.6 s/iteration this run takes ~3.6 hours on CPU; use --time-budget 12h or a GPU"
    assert duration_warning(0.5, 100) is None  # under an hour: nothing to warn about


def test_cli_exit_code_and_options_of_an_interrupted_train(monkeypatch, capsys):
    """The CLI passes --force and leaves --seed/--selfreg unset (so --continue can take the run's), and an
    interrupted training exits like the signal (143 for SIGTERM) with its resume line, not 'error:'."""
    import autoseg.training
    from autoseg.cli import main

    seen = {}

    def fake_train(*args, **kwargs):
        seen.update(kwargs)
        raise TrainingInterrupted("fold_0: SIGTERM at epoch 1 iteration 2; checkpoint_latest.pt is saved: resume "
                                  "with `autoseg train D 2d 0 --continue`", 143)

    monkeypatch.setattr(autoseg.training, "train", fake_train, raising=False)
    assert main(["train", "D", "2d", "0", "--force"]) == 143
    assert seen["force"] is True and seen["seed"] is None and seen["selfreg"] is None
    err = capsys.readouterr().err
    assert err.startswith("autoseg train: fold_0: SIGTERM at epoch 1") and "error:" not in err


def test_sigterm_to_the_command_saves_and_exits_143(tiny):
    """Issue 18.5b end to end: `autoseg train` killed by a scheduler's SIGTERM saves checkpoint_latest.pt,
    exits 143 and prints the resume command (the signal is sent once epoch 1 is printed, so it lands in the
    loop; 1000 epochs cannot finish first)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "autoseg", "train", DATASET, "2d", "0", "--root", str(tiny), "--device", "cpu",
               "--epochs", "1000", "--iters-per-epoch", "2", "-np", "0", "--no-validation"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("epoch 1/1000"), line + process.stderr.read()
        process.terminate()  # SIGTERM
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("autoseg train: ") and "SIGTERM at epoch" in last
    assert last.endswith(f"checkpoint_latest.pt is saved: resume with `autoseg train {DATASET} 2d 0 --root {tiny} "
                         "--continue`")
    metadata = load_checkpoint(fold_path(tiny) / "checkpoint_latest.pt")["metadata"]
    assert metadata["epoch"] >= 1 and json.loads((fold_path(tiny) / "run.json").read_text())["epochs"] == 1000


def test_temporary_files_of_a_killed_run_are_cleared_under_the_fold_lock(tiny):
    """kill -9 during a checkpoint write leaves `.checkpoint_latest.pt.<random>.partial.pt` behind for ever."""
    folder = fold_path(tiny)
    (folder / "validation").mkdir(parents=True)
    leftovers = [folder / ".checkpoint_latest.pt.k3j9.partial.pt", folder / "validation" / ".case_000.nii.gz.x.partial.nii.gz"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    train(DATASET, "2d", 0, root=tiny, **SHORT, **FAST)
    assert not any(path.exists() for path in leftovers)
    assert not list(folder.rglob("*.partial*"))
