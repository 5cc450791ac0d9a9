"""Real disk faults, not simulated ones: `train.py` writes its run folder on a small tmpfs mounted in a private
mount namespace (`unshare -m` as root, `unshare -rm` otherwise), and in the middle of training the disk is
filled up, or the folder is remounted read-only (PREFIXTUNING_FAULT's `run` action at a chosen batch).

Asserted: the command exits 1 with one line naming the file, the cause and (full disk) the free space; the
checkpoints written before are whole and no temporary file is left; after the disk is freed (or made writable),
`ckpt_path=last` finishes the run. Skipped, saying why, where this machine cannot mount a tmpfs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_faults import RUN

SCRIPT = r"""
set -u
M="$1"; OUT="$2"; FAULT="$3"; CLEAR="$4"; PRE="$5"
mount -t tmpfs -o size=32m tmpfs "$M" || exit 77
sh -c "$PRE" || exit 78
cd "$ROOT"
PREFIXTUNING_FAULT="$FAULT" "$PY" train.py $ARGS hydra.run.dir="$M/run" > "$OUT/first.out" 2> "$OUT/first.err"
echo $? > "$OUT/first.rc"
cp -a "$M/run" "$OUT/after_first"
sh -c "$CLEAR"
"$PY" train.py hydra.run.dir="$M/run" ckpt_path=last > "$OUT/second.out" 2> "$OUT/second.err"
echo $? > "$OUT/second.rc"
cp -a "$M/run" "$OUT/after_second"
"""


def _unshare() -> list[str] | None:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    base = [exe, "-m"] if os.geteuid() == 0 else [exe, "-rm"]
    probe = subprocess.run([*base, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, text=True)
    return base if probe.returncode == 0 else None


UNSHARE = _unshare()
needs_tmpfs = pytest.mark.skipif(UNSHARE is None, reason="this machine cannot mount a tmpfs in a private mount "
                                 "namespace (unshare -m / -rm refused); the full-disk and read-only cases need it")


def run_in_tmpfs(tmp_path: Path, fault: dict, clear: str, pre: str = "true") -> Path:
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ROOT": str(ROOT), "PY": sys.executable,
           "ARGS": " ".join(RUN + ["optim.epochs=3"])}
    proc = subprocess.run([*UNSHARE, "sh", "-c", SCRIPT, "sh", str(mnt), str(out), json.dumps(fault),
                           clear.replace("$M", str(mnt)), pre.replace("$M", str(mnt))], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def check_first_attempt(out: Path) -> list[str]:
    err = (out / "first.err").read_text().strip().splitlines()
    assert (out / "first.rc").read_text().strip() == "1", err[-20:]
    names = sorted(p.name for p in (out / "after_first" / "checkpoints").iterdir())
    assert names and all(n.endswith(".ckpt") for n in names), names  # no temporary file under any name
    for n in names:
        assert torch.load(out / "after_first" / "checkpoints" / n, weights_only=True)["global_step"] == 6
    assert not (out / "after_first" / "metrics.json").exists()
    return err


def check_second_attempt(out: Path) -> None:
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()[-3000:]
    metrics = json.loads((out / "after_second" / "metrics.json").read_text())
    assert metrics["attempts"] == 2 and "test/BLEU" in metrics
    steps = [json.loads(line)["step"] for line in (out / "after_second" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "each step logged once, in order, across the two attempts"


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_mid_run_is_one_sentence_and_the_run_continues_once_space_is_freed(tmp_path):
    fill = "dd if=/dev/zero of=$M/filler bs=64k 2>/dev/null; true"
    out = run_in_tmpfs(tmp_path, {"at": "train_batch", "n": 8, "run": fill.replace("$M", str(tmp_path / "mnt"))},
                       "rm -f $M/filler")
    err = check_first_attempt(out)
    last = err[-1]
    assert last.startswith("error (WriteError): could not write ") and "No space left on device (errno 28)" in last
    assert "MiB free in " in last and "untouched" in last
    check_second_attempt(out)


@pytest.mark.slow
@needs_tmpfs
def test_a_folder_made_read_only_mid_run_is_one_sentence_and_the_run_continues_once_writable(tmp_path):
    # the checkpoints folder is its own tmpfs (a filesystem with a file open for writing, like the run's log,
    # cannot be remounted read-only); it turns read-only in epoch 1, before that epoch's checkpoints
    ck = tmp_path / "mnt" / "run" / "checkpoints"
    out = run_in_tmpfs(tmp_path, {"at": "train_batch", "n": 8, "run": f"mount -o remount,ro {ck}"},
                       f"mount -o remount,rw {ck}", pre=f"mkdir -p {ck} && mount -t tmpfs -o size=8m tmpfs {ck}")
    err = check_first_attempt(out)
    last = err[-1]
    assert last.startswith("error (WriteError): could not write ") and "Read-only file system" in last, last
    assert "is not writable" in last
    check_second_attempt(out)
