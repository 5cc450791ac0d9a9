"""The remaining CLIs the README names, as a user types them (train.py, evaluate.py, serving, report and
gates have their own subprocess tests): export.py and `python -m prefixtuning.score`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_cfg
from prefixtuning.training import train

FIX = ROOT / "tests" / "fixtures" / "metric_parity"


def _run(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_export_cli_writes_the_inference_prefix(tmp_path):
    train(compose_cfg(["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2",
                       "optim.epochs=1", "test_after_training=false", "val_generation.enabled=false",
                       "prefix=reparam", "prefix.mid_dim=16"], tmp_path / "run"))
    proc = _run(["export.py", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'exp'}",
                 f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[export]" in proc.stdout and "method=prefix" in proc.stdout
    meta = json.loads((tmp_path / "exp" / "prefix.json").read_text())
    assert meta["kind"] == "static" and meta["trained_kind"] == "reparam"  # the MLP is dropped
    tensors = load_file(str(tmp_path / "exp" / "prefix.safetensors"))
    assert set(tensors) == {"decoder.keys", "decoder.values"}
    proc = _run(["export.py", f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'x'}",
                 f"hydra.run.dir={tmp_path / 'hydra2'}"])
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_score_cli_gives_the_official_numbers(tmp_path):
    proc = _run(["-m", "prefixtuning.score", "--task", "e2e", "--hyp", str(FIX / "e2e_example_system.txt"),
                 "--refs", str(FIX / "e2e_example_references.txt")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout)["scores"]
    assert round(scores["BLEU"], 4) == 0.7203 and round(scores["NIST"], 4) == 7.8212  # e2e-metrics' own example
    bad = tmp_path / "short.txt"
    bad.write_text("one line\n")
    proc = _run(["-m", "prefixtuning.score", "--task", "e2e", "--hyp", str(bad),
                 "--refs", str(FIX / "e2e_example_references.txt")])
    assert proc.returncode == 2 and "error:" in proc.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for hyp, refs in ((empty, empty), (empty, FIX / "e2e_example_references.txt")):  # nothing to score: an error
        proc = _run(["-m", "prefixtuning.score", "--task", "e2e", "--hyp", str(hyp), "--refs", str(refs)])
        assert proc.returncode == 2 and f"error: {empty} is empty: nothing to score" in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real (python benchmarks/gpu.py)")
def test_the_gpu_benchmark_is_skipped_cleanly_without_cuda():
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("benchmarks/gpu.py: skipped: no CUDA GPU on this machine "
                                   "(torch.cuda.is_available() is False)")
