"""Fault injection, for the reliability tests: a fault at a chosen, countable point of a real run, so a test
can kill or stop `train.py` exactly there instead of guessing with a timer.

    PREFIXTUNING_FAULT='{"at": "train_batch", "n": 5, "signal": "SIGKILL"}' python train.py ...

Points (`at`), each counted from 1 within this process:
- `train_batch`: after the n-th training batch (the optimizer step of that batch done);
- `validation_batch`: after the n-th validation batch during training;
- `test_decode`: after the n-th decoded batch of the test split;
- `checkpoint_write`: during the n-th checkpoint write, with half of the file written to its temporary name;
- `write`: during the n-th crash-safe write of any file (metrics.json, config.yaml, predictions, ...).

Actions: `"signal": "SIGTERM" | "SIGINT" | "SIGKILL" | ...` sends that signal to this process; `"run": "<shell
command>"` runs a command there and continues (e.g. remount the run folder read-only). Without the variable
nothing here runs. Nothing else reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

from . import atomic

ENV = "PREFIXTUNING_FAULT"
POINTS = ("train_batch", "validation_batch", "test_decode", "checkpoint_write", "write")


class FaultSpecError(ValueError):
    pass


def _spec() -> dict | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except ValueError as err:
        raise FaultSpecError(f"${ENV} is not JSON: {err}") from None
    if spec.get("at") not in POINTS or not isinstance(spec.get("n"), int) or ("signal" in spec) == ("run" in spec):
        raise FaultSpecError(f"${ENV}={raw!r}: needs at (one of {', '.join(POINTS)}), an integer n and one of "
                             f"signal or run")
    return spec


_SPEC = None
_COUNTS: dict[str, int] = {}


def fire_if(point: str) -> None:
    """Count one `point`; at the n-th, act."""
    spec = _SPEC
    if spec is None or spec["at"] != point:
        return
    _COUNTS[point] = _COUNTS.get(point, 0) + 1
    if _COUNTS[point] != spec["n"]:
        return
    print(f"[fault] {point} #{spec['n']}: {spec.get('signal') or spec.get('run')}", flush=True)
    if "run" in spec:
        subprocess.run(spec["run"], shell=True, check=True)
    else:
        os.kill(os.getpid(), getattr(signal, spec["signal"]))


def _on_write(path: Path, tmp: Path) -> None:
    is_ckpt = path.suffix == ".ckpt"
    point = "checkpoint_write" if is_ckpt else "write"
    if _SPEC is None or _SPEC["at"] != point:
        return
    if _COUNTS.get(point, 0) + 1 == _SPEC["n"]:  # the write is cut half-way, as a kill would cut it
        data = tmp.read_bytes()
        tmp.write_bytes(data[: len(data) // 2])
    fire_if(point)


class FaultInjection(L.Callback):
    def on_train_batch_end(self, trainer, *args, **kwargs):
        fire_if("train_batch")

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            fire_if("validation_batch")


def install() -> list:
    """Read $PREFIXTUNING_FAULT once; returns the Lightning callbacks to add (none without it)."""
    global _SPEC
    _SPEC = _spec()
    if _SPEC is None:
        return []
    atomic.FAULT_HOOK = _on_write
    return [FaultInjection()]
