"""No silent failure, no lost work, no run folder damaged by a failed command.

Principles and the tests that hold them:
- training never continues on garbage: NaN injected at a chosen step; an overflowing learning rate (CLI)
- a resume is exact or refused before anything is touched: no checkpoint, changed settings, corrupt file,
  the README command without the original overrides; logs continue (CSV rows kept)
- a failed write never damages what was written: an interrupted checkpoint write, a full disk, a run
  folder that cannot be written
- the serving bank never drops the other requests (tests/test_serving.py has the mixed-request file)
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT, compose_cfg
from prefixtuning.checkpoint import RunFolderError
from prefixtuning.lightning_module import NonFiniteError
from prefixtuning.resume import ResumeError
from prefixtuning.training import train

SMALL = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=3",
         "test_after_training=false", "val_generation.enabled=false", "logger=csv"]
# the same run as a user types it (train.py composes the root default, so the tiny recipe is spelled out)
CLI_TINY = ["backbone=tiny-gpt2", "init=random", "optim.lr=1.0e-2", "data.batch_size=16", *SMALL]


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args, expect_ok=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class InjectNaN(L.Callback):
    """Turns the gradients into NaN right before the optimizer step of `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


# ---------------------------------------------------------------- 1. never continue on garbage

def test_nan_at_a_chosen_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose_cfg(SMALL + ["optim.epochs=3"], tmp_path)
    with pytest.raises(NonFiniteError) as err:
        train(cfg, callbacks=[InjectNaN(step=4)])  # epoch 1 (3 steps per epoch), after epoch 0's checkpoint
    msg = str(err.value)
    assert "update of step 4 (epoch 1, batch 1 of the epoch)" in msg and "optim.lr=0.01" in msg
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the last good checkpoint is gone"
    for c in ckpts:
        state = torch.load(c, weights_only=True)
        assert state["global_step"] == 3  # written at the end of epoch 0, never after the NaN
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "metrics.json").exists()  # no metrics reported for a broken run


def test_overflowing_learning_rate_exits_nonzero_naming_the_setting(tmp_path):
    proc = cli(CLI_TINY + ["optim.epochs=1", "optim.lr=1e30", f"hydra.run.dir={tmp_path}"], expect_ok=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "NonFiniteError" in err and "optim.lr=1e+30" in err, err[-2000:]
    assert "at step" in err and "batch" in err
    assert not any(tmp_path.glob("checkpoints/*.ckpt")) or all(
        all(torch.isfinite(v).all() for v in torch.load(c, weights_only=True)["state_dict"].values())
        for c in tmp_path.glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- 2. resume exact or refused, untouched

def test_ckpt_path_last_without_a_checkpoint_is_an_error_and_touches_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = folder_digest(tmp_path)
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(compose_cfg(SMALL + ["ckpt_path=last"], tmp_path))
    assert folder_digest(tmp_path) == before
    proc = cli(CLI_TINY + ["ckpt_path=last", f"hydra.run.dir={tmp_path}"], expect_ok=False)
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr
    assert folder_digest(tmp_path) == before


def test_resume_restores_the_runs_own_settings_refuses_changes_and_keeps_logs(tmp_path):
    run = tmp_path / "run"
    first = cli(CLI_TINY + ["optim.epochs=1", f"hydra.run.dir={run}"])
    console = first.stdout + first.stderr
    assert console.count("GPU available") == 1, "each Lightning log line is printed once"
    assert (run / "train.log").read_text().count("GPU available") == 1  # and kept once in the run's log
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    csv_before = (run / "csv" / "metrics.csv").read_text().splitlines()
    # the README's command, without the original overrides: resumes the run as it was configured
    cli([f"hydra.run.dir={run}", "ckpt_path=last"])
    assert (run / "csv" / "metrics.csv").read_text().splitlines()[: len(csv_before)] == csv_before
    # a changed setting is refused, and the folder stays byte-identical
    before = folder_digest(run)
    proc = cli([f"hydra.run.dir={run}", "ckpt_path=last", "optim.epochs=2"], expect_ok=False)
    assert proc.returncode != 0
    assert "optim.epochs: 1 in the run, 2 now" in proc.stderr and "resume_allow_changes=true" in proc.stderr
    assert folder_digest(run) == before
    # by explicit choice: continues with a warning, and every log continues
    first_metrics = (run / "metrics.json").read_text()
    proc = cli([f"hydra.run.dir={run}", "ckpt_path=last", "optim.epochs=2", "resume_allow_changes=true"])
    assert "WARNING: resume_allow_changes=true" in proc.stdout
    # while it trains again it is not finished; its first result is kept under another name
    assert (run / "metrics.before_attempt2.json").read_text() == first_metrics
    after = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert after[: len(csv_before)] == csv_before and len(after) > len(csv_before)
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[0]["epoch"] == 0 and jsonl[-1]["epoch"] == 1
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides  # the run's own command, kept


def test_corrupt_checkpoint_is_named_and_the_last_good_one_offered(tmp_path):
    train(compose_cfg(SMALL + ["optim.epochs=1"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = [p for p in (tmp_path / "checkpoints").glob("*.ckpt") if p != last]
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a crash of another tool
    before = folder_digest(tmp_path)
    with pytest.raises(ResumeError) as err:
        train(compose_cfg(SMALL + ["optim.epochs=1", "ckpt_path=last"], tmp_path))
    msg = str(err.value)
    assert f"checkpoint {last} is corrupt" in msg and f"ckpt_path={good[-1]}" in msg
    assert folder_digest(tmp_path) == before


def test_last_checkpoint_follows_training_when_the_metric_stops_improving(tmp_path):
    """Lightning's save_last refreshed last.ckpt only with a new best: with a metric that never improves
    after epoch 0 (mode=max on a falling loss), ckpt_path=last resumed from epoch 0. It is the latest now."""
    train(compose_cfg(SMALL + ["optim.epochs=3", "checkpoint.mode=max"], tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    best = [p for p in (tmp_path / "checkpoints").glob("epoch*.ckpt")]
    assert last["global_step"] == 9 and last["epoch"] == 2
    assert len(best) == 1 and torch.load(best[0], weights_only=True)["global_step"] == 3


# ---------------------------------------------------------------- 3. a failed write damages nothing

def _fail_on_checkpoint_write(n: int, exc: BaseException):
    """atomic.FAULT_HOOK: the n-th checkpoint write dies with half of the file written to its temporary name."""
    calls = {"n": 0}

    def hook(path, tmp):
        if path.suffix == ".ckpt":
            calls["n"] += 1
            if calls["n"] == n:
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                raise exc
    return hook


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from prefixtuning import atomic

    # the first epoch's two files are written; the next write dies half-way
    monkeypatch.setattr(atomic, "FAULT_HOOK", _fail_on_checkpoint_write(3, KeyboardInterrupt("killed")))
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns the interrupt into exit status 1
        train(compose_cfg(SMALL + ["optim.epochs=2"], tmp_path))
    monkeypatch.undo()
    for c in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert torch.load(c, weights_only=True)["global_step"] == 3  # whole, from epoch 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]  # no temp left


def test_full_disk_is_reported_with_the_file_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    from prefixtuning import atomic

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic, "FAULT_HOOK", _fail_on_checkpoint_write(3, full))
    with pytest.raises(RunFolderError) as err:
        train(compose_cfg(SMALL + ["optim.epochs=2"], tmp_path))
    monkeypatch.undo()
    msg = str(err.value)
    assert "No space left on device" in msg and "untouched" in msg and " MiB free in " in msg
    assert str(tmp_path / "checkpoints") in msg
    for c in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert torch.load(c, weights_only=True)["global_step"] == 3
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]


def test_run_folder_that_cannot_be_written_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match=f"the run folder {blocker / 'run'} cannot be written"):
        train(compose_cfg(SMALL, blocker / "run"))


# ---------------------------------------------------------------- 5. faults as processes

def test_eval_device_auto_picks_what_is_there_and_a_missing_gpu_is_named():
    from prefixtuning.evaluation import eval_device

    assert eval_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert eval_device(None) == eval_device("auto")
    assert eval_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu0' \(eval.yaml\): not a torch device"):
        eval_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' \(eval.yaml\): this machine has no CUDA GPU"):
            eval_device("cuda")


# ---------------------------------------------------------------- 3. signals, one run per folder, empty runs

def test_a_second_process_on_the_same_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    from prefixtuning.checkpoint import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / ".run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                        "started": "2026-11-30 03:00:00"}))
        before = folder_digest(tmp_path)
        with pytest.raises(RunFolderError, match=f"is in use by PID {holder.pid} on {socket.gethostname()}"):
            train(compose_cfg(SMALL, tmp_path))
        assert folder_digest(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)  # the holder is gone: its lock is stale and taken over
    lock.acquire()
    assert json.loads((tmp_path / ".run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=0", "trainer.max_steps=0: this run would train nothing"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0: this run would train nothing"),
    ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches=0: this run would train nothing"),
    ("optim.epochs=0", "optim.epochs=0 is below its minimum 1")])
def test_a_run_that_would_train_nothing_is_refused_before_any_work(tmp_path, override, message):
    from prefixtuning.config_check import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(compose_cfg([*SMALL, override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a multirun
def test_a_basic_sweep_whose_jobs_end_before_a_validation_succeeds(tmp_path):
    """The objective (optimized_metric) matters only to sweepers that read it (Optuna); the basic sweeper's
    jobs that never validate finish normally."""
    proc = subprocess.run([sys.executable, "train.py", "-m", *CLI_TINY, "prefix.length=2,4", "trainer.max_steps=1",
                           "validate_before_training=false", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2


@pytest.mark.slow  # a multirun, twice
def test_a_killed_sweep_continues_skipping_finished_jobs(tmp_path):
    """The same -m command with sweep_resume=true: a finished job is skipped (its files untouched), a job killed
    after its last checkpoint continues from it and finishes."""
    args = ["train.py", "-m", *CLI_TINY, "prefix.length=2,4", "optim.epochs=1", "validate_before_training=false",
            f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    done = folder_digest(tmp_path / "0")
    (tmp_path / "1" / "metrics.json").unlink()  # job 1 as if killed after writing its checkpoint
    again = subprocess.run([sys.executable, *args, "sweep_resume=true"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-2000:]
    assert f"{tmp_path / '0'} finished already: skipped" in out
    assert f"continuing {tmp_path / '1'} from its last checkpoint" in out
    kept = lambda d: {k: v for k, v in d.items() if k == "metrics.json" or k.startswith("checkpoints")}  # noqa: E731
    assert kept(folder_digest(tmp_path / "0")) == kept(done) and "metrics.json" in kept(done)
    assert (tmp_path / "1" / "metrics.json").is_file()
    # the report says which job ran twice
    from prefixtuning.report import report

    report([tmp_path], tmp_path / "rep")
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert f"- {tmp_path / '1'}: 2 attempts (new, resume)" in md and f"- {tmp_path / '0'}:" not in md
    # the same -m command without sweep_resume is refused before Hydra rewrites any job folder
    before = folder_digest(tmp_path / "1")
    plain = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 1 and "holds 2 job folder(s) of a sweep already" in plain.stderr
    assert "sweep_resume=true" in plain.stderr and folder_digest(tmp_path / "1") == before
