"""The embedded default as the user types it (`python train.py trainer=cpu`, what `make train` runs), on the
real offline backbone, then `python evaluate.py` on its checkpoint: exit codes, printed report, files."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from prefixtuning.local_backbones import SMOLLM2_135M_Q4


def _run(args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _check_run(out_dir, stdout, n_test):
    metrics = json.loads((out_dir / "metrics.json").read_text())
    # honest naming: the hub id was asked for, the quantized Instruct substitute was used, and every record says so
    assert "using its offline substitute smollm2-135m-instruct-q4_1" in stdout
    assert f"frozen backbone 134,515,008 of 134,515,008 ({SMOLLM2_135M_Q4.name})" in stdout
    assert "method=prefix (static prefix, P=5) | trainable 57,600 = 0.0428% of the backbone" in stdout
    assert metrics["backbone"] == SMOLLM2_135M_Q4.name
    ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["prefixtuning"]["backbone"] == SMOLLM2_135M_Q4.name
    assert 0.0003 < metrics["trainable_share_of_backbone"] < 0.0005  # 57,600 / 134.5M
    assert metrics["val/loss"] < metrics["val/loss_start"]
    for i in range(3):
        assert f"[test {i}] input:      name : " in stdout and f"[test {i}] prediction: " in stdout
    preds = (out_dir / "predictions_test.txt").read_text().splitlines()
    assert len(preds) == n_test and all(preds)
    readable = [json.loads(line) for line in (out_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in readable] == preds
    assert all(r["input"].startswith("name : ") and r["references"] for r in readable)
    return metrics, preds


@pytest.mark.slow
def test_default_command_shrunk_then_evaluate(tmp_path):
    run = tmp_path / "run"
    stdout = _run(["train.py", "trainer=cpu", "trainer.enable_progress_bar=false", "data.max_train_examples=64", "optim.epochs=1",
                   "val_generation.max_inputs=2", "test_max_inputs=3", f"hydra.run.dir={run}"])
    metrics, _ = _check_run(run, stdout, 3)
    ev = tmp_path / "eval"
    out = _run(["evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "split=test", "max_inputs=3",
                "progress=false", f"hydra.run.dir={ev}"])
    scored = json.loads((ev / "metrics.json").read_text())
    assert scored["BLEU"] == metrics["test/BLEU"] and scored["inputs"] == 3
    assert (ev / "predictions_test.txt").read_text() == (run / "predictions_test.txt").read_text()
    assert "[eval]" in out and "using its offline substitute" not in out  # the checkpoint's backbone, directly


@pytest.mark.slow
def test_default_command_reaches_the_target():
    """The full embedded default (~6 minutes on 2 cores): test BLEU >= 0.55 on the 20 sample MRs, and the
    predictions name the restaurant of their input."""
    import tempfile
    from pathlib import Path

    run = Path(tempfile.mkdtemp()) / "run"
    stdout = _run(["train.py", "trainer=cpu", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"])
    metrics, preds = _check_run(run, stdout, 20)
    assert metrics["test/BLEU"] >= 0.55, metrics
    from conftest import compose_cfg
    from prefixtuning.data.datamodule import build_dataset

    groups = build_dataset(compose_cfg([], run.parent / "cfg", tiny=False).data).eval_groups("test")
    names = [g.source.split(" | ")[0].removeprefix("name : ") for g in groups]
    # measured: 17 of 20; the misses put the "near" venue in the subject position
    assert sum(n in p for n, p in zip(names, preds)) >= 15, list(zip(names, preds))
