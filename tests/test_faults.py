"""The fault-injection suite: `train.py` as a user runs it, stopped at a chosen point by a chosen fault
(PREFIXTUNING_FAULT, src/prefixtuning/faults.py), then continued with the one documented command

    python train.py hydra.run.dir=<run> ckpt_path=last

and compared with the same run left alone: the trained prefix (every tensor), the test predictions, every
number in metrics.json and the logged training losses are equal. Each case also asserts the exit status,
interrupted.json and that every checkpoint in the folder loads.

Faults: SIGTERM (SLURM's pre-emption), SIGINT (Ctrl-C) and SIGKILL, before the first checkpoint, mid-epoch,
during validation, during a checkpoint write and during the test decode; a resumed finished run; a new run
refused in a folder that holds one. Real full-disk and read-only folders are in test_disk_faults.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

RUN = ["backbone=tiny-gpt2", "init=random", "optim.lr=1.0e-2", "data.batch_size=16", "trainer=cpu",
       "trainer.enable_progress_bar=false", "val_generation.enabled=false", "logger=csv", "optim.epochs=2",
       "trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "validate_before_training=false",
       "test_max_inputs=8", "decoding.batch_size=4", "decoding.max_new_tokens=8"]
# 6 training batches and 2 validation batches per epoch, 2 epochs; the test decode has 2 batches
VARIES = ("output_dir", "best_checkpoint", "attempts")


def train_py(args, fault=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PREFIXTUNING_FAULT", None)
    if fault:
        env["PREFIXTUNING_FAULT"] = json.dumps(fault)
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def outcome(run: Path) -> dict:
    """What an uninterrupted run and an interrupted-then-continued one must share."""
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [(r["step"], r["train/loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    return {"prefix": torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
            "metrics": {k: v for k, v in metrics.items() if k not in VARIES},
            "best": Path(metrics["best_checkpoint"]).name,
            "predictions": (run / "predictions_test.txt").read_text(), "losses": losses}


def assert_same(a: dict, b: dict) -> None:
    assert a["prefix"].keys() == b["prefix"].keys()
    for k in a["prefix"]:
        assert torch.equal(a["prefix"][k], b["prefix"][k]), k
    assert a["metrics"] == b["metrics"]
    assert a["best"] == b["best"] and a["predictions"] == b["predictions"]
    assert a["losses"] == b["losses"]


def checkpoints_whole(run: Path, temporaries_allowed: bool = False) -> list[str]:
    """The checkpoints in the folder all load; the only other files are temporaries of a killed write, and
    only where allowed (they never carry a final name)."""
    from prefixtuning.atomic import is_temporary

    folder = run / "checkpoints"
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    names = [n for n in files if not is_temporary(folder / n)]
    assert all(n.endswith(".ckpt") for n in names), names
    assert temporaries_allowed or names == files, files
    for n in names:
        torch.load(folder / n, weights_only=True)
    return names


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = train_py(RUN + [f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outcome(run)


CASES = {
    # name: (fault, exit status, what interrupted.json says about the checkpoint; None: no interrupted.json)
    "sigterm_mid_epoch": ({"at": "train_batch", "n": 8, "signal": "SIGTERM"}, 143, "mid-epoch"),
    "sigkill_before_first_checkpoint": ({"at": "train_batch", "n": 2, "signal": "SIGKILL"}, -9, None),
    "sigkill_during_test_decode": ({"at": "test_decode", "n": 1, "signal": "SIGKILL"}, -9, None),
    "sigint_mid_epoch": ({"at": "train_batch", "n": 9, "signal": "SIGINT"}, 130, "mid-epoch"),
    "sigterm_during_validation": ({"at": "validation_batch", "n": 3, "signal": "SIGTERM"}, 143, "epoch-end"),
    "sigterm_in_first_epoch": ({"at": "train_batch", "n": 3, "signal": "SIGTERM"}, 143, "mid-epoch"),
    "sigkill_mid_epoch": ({"at": "train_batch", "n": 9, "signal": "SIGKILL"}, -9, None),
    "sigkill_during_checkpoint_write": ({"at": "checkpoint_write", "n": 3, "signal": "SIGKILL"}, -9, None),
    "sigterm_during_test_decode": ({"at": "test_decode", "n": 2, "signal": "SIGTERM"}, 143, "epoch-end"),
}
FAST = ("sigterm_mid_epoch", "sigkill_before_first_checkpoint")  # the others: slow tier (about 50 s each)


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_fault_then_ckpt_path_last_equals_the_uninterrupted_run(case, tmp_path, reference):
    fault, status, ckpt = CASES[case]
    run = tmp_path / "run"
    first = train_py(RUN + [f"hydra.run.dir={run}"], fault)
    out = first.stdout + first.stderr
    assert first.returncode == status, out[-3000:]
    assert not (run / "metrics.json").exists()  # a stopped run never looks finished
    assert not (run / ".run.lock").exists() or status == -9  # a kill leaves its lock: the next command takes it over
    names = checkpoints_whole(run, temporaries_allowed=status == -9)
    if ckpt is None:
        assert not (run / "interrupted.json").exists()
    else:
        state = json.loads((run / "interrupted.json").read_text())
        assert state["by"] == fault["signal"] and state["resume"] == f"python train.py hydra.run.dir={run} ckpt_path=last"
        if ckpt == "mid-epoch":
            assert "mid-epoch checkpoint" in state["checkpoint"] and f"mid-epoch checkpoint: {run}" in out
            assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == fault["n"]
        else:
            assert "mid-epoch" not in state["checkpoint"]
    if case == "sigkill_before_first_checkpoint":
        assert names == []
    if case == "sigkill_during_checkpoint_write":  # the epoch-0 files are whole, the cut one never got its name
        assert names == ["epoch0-step6.ckpt", "last.ckpt"]
        assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the cut temporary
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    again = train_py([f"hydra.run.dir={run}", "ckpt_path=last"])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert not (run / "interrupted.json").exists()
    assert checkpoints_whole(run)  # the next command removed what a killed write left
    assert_same(outcome(run), reference)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["mode"] for h in history] == ["new", "restart" if not names else "resume"]
    assert json.loads((run / "metrics.json").read_text())["attempts"] == 2
    if not names:
        assert "stopped before its first checkpoint: starting it again" in out
        assert (run / "attempt1" / "config.yaml").is_file()  # the first attempt's files are kept aside


@pytest.mark.slow
def test_a_finished_run_resumed_is_left_untouched_and_a_new_run_into_it_refused(tmp_path, reference):
    from test_reliability import folder_digest

    run = tmp_path / "run"
    assert train_py(RUN + [f"hydra.run.dir={run}"]).returncode == 0
    before = folder_digest(run)
    again = train_py([f"hydra.run.dir={run}", "ckpt_path=last"])
    assert again.returncode == 0 and f"{run} finished already: skipped" in again.stdout
    assert folder_digest(run) == {**before, "train.log": folder_digest(run)["train.log"]}  # only its log grew
    new = train_py(RUN + [f"hydra.run.dir={run}"])
    assert new.returncode == 1
    assert f"error (ResumeError): the run folder {run} holds a finished run (metrics.json)" in new.stderr
    assert folder_digest(run) == {**before, "train.log": folder_digest(run)["train.log"]}
    # ckpt_path=auto (for job scripts that are requeued): starts a new folder, skips a finished one
    fresh = tmp_path / "fresh"
    assert train_py(RUN + [f"hydra.run.dir={fresh}", "ckpt_path=auto", "optim.epochs=1"]).returncode == 0
    assert (fresh / "metrics.json").is_file() and (fresh / ".hydra" / "overrides.yaml").is_file()
    assert "finished already" in train_py([f"hydra.run.dir={fresh}", "ckpt_path=auto"]).stdout
