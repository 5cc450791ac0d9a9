"""The report command on a real tiny multirun (2 prefix lengths x 2 seeds), as a user runs it: the Hydra
callback at the end of the sweep, then `python -m prefixtuning.report` on the folder with a failed job in it.
Groups, n and mean ± std are checked against a hand computation from the jobs' metrics.json, and the
figure against the same numbers."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from prefixtuning.report import report

SWEEP = ["backbone=tiny-gpt2", "init=random", "optim.lr=1.0e-2", "data.batch_size=16", "trainer=cpu",
         "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2", "optim.epochs=1",
         "val_generation.enabled=false", "validate_before_training=false", "test_max_inputs=3", "decoding=greedy",
         "decoding.max_new_tokens=6", "prefix.length=2,3", "seed=0,1"]


def _run(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # a 6-job multirun and its report
def test_multirun_report_groups_means_figures_and_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    out = _run(["train.py", "-m", *SWEEP, f"hydra.sweep.dir={sweep}",
                "+hydra.callbacks.report._target_=prefixtuning.report.ReportCallback"])
    assert "[report] 4 jobs (0 without results)" in out and str(sweep / "report" / "summary.md") in out
    # a job that died before writing metrics.json
    dead = sweep / "4" / ".hydra"
    dead.mkdir(parents=True)
    # Hydra writes a job's overrides when it starts: the same command with prefix.length=4
    (dead / "overrides.yaml").write_text((sweep / "0" / ".hydra" / "overrides.yaml").read_text()
                                         .replace("prefix.length=2", "prefix.length=4"))
    out = _run(["-m", "prefixtuning.report", str(sweep), "--out", str(tmp_path / "rep")])
    assert f"without results: {sweep / '4'}: no metrics.json" in out

    # hand computation from the jobs' own files, for every metric (at this size BLEU is 0 everywhere; NIST,
    # METEOR, ROUGE_L and CIDEr vary between jobs)
    hand: dict[tuple[str, str], list[float]] = {}
    for job in ("0", "1", "2", "3"):
        ov = dict(line.removeprefix("- ").split("=", 1) for line in (sweep / job / ".hydra" / "overrides.yaml")
                  .read_text().splitlines() if "prefix.length" in line)
        for k, v in json.loads((sweep / job / "metrics.json").read_text()).items():
            if k.startswith("test/") and isinstance(v, float):
                hand.setdefault((ov["prefix.length"], k), []).append(v)
    rows = {r["prefix.length"]: r for r in csv.DictReader(open(tmp_path / "rep" / "summary.csv"))}
    assert set(rows) == {"2", "3"}  # the dead job has no group: it is listed, not averaged
    assert any(max(xs) > min(xs) for xs in hand.values())  # the check below has something to check
    for (length, metric), xs in hand.items():
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        assert rows[length]["n"] == "2"
        assert abs(float(rows[length][f"{metric} mean"]) - mean) < 1e-12, metric
        assert abs(float(rows[length][f"{metric} std"]) - std) < 1e-12, metric
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "| prefix.length | n |" in md and "Jobs without results" in md and "prefix.length=4" in md
    jobs = list(csv.DictReader(open(tmp_path / "rep" / "jobs.csv")))
    assert len(jobs) == 5 and sum(j["status"] != "ok" for j in jobs) == 1

    # the figure plots exactly those numbers
    r = report([sweep], tmp_path / "rep2", metric="test/ROUGE_L")
    xs, means, stds = r["figures"]["prefix_length"]["test/ROUGE_L"]
    assert xs == [2.0, 3.0]
    for x, m, s in zip(xs, means, stds):
        ref = hand[(str(int(x)), "test/ROUGE_L")]
        mu = sum(ref) / 2
        assert abs(m - mu) < 1e-12 and abs(s - math.sqrt(sum((v - mu) ** 2 for v in ref) / 2)) < 1e-12
    assert (tmp_path / "rep2" / "prefix_length.png").stat().st_size > 1000


def test_optuna_search_optimizes_the_configured_metric(tmp_path):
    """hparams_search=optuna over lr x prefix length: each trial's objective is its optimized_metric, and the
    best value Optuna reports is the best of the jobs' own metrics.json (here val/loss, minimized)."""
    from omegaconf import OmegaConf

    sweep = tmp_path / "optuna"
    _run(["train.py", "hparams_search=optuna", "optimized_metric=val/loss", "optimized_direction=minimize",
          "backbone=tiny-gpt2", "init=random", "data.batch_size=16", "trainer=cpu", "trainer.enable_progress_bar=false",
          "trainer.limit_train_batches=2", "optim.epochs=1", "val_generation.max_inputs=2", "test_after_training=false",
          "validate_before_training=false", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"])
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    losses = {}
    for job in ("0", "1", "2"):
        ov = dict(o.split("=", 1) for o in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml"))
        losses[(float(ov["optim.lr"]), int(ov["prefix.length"]))] = json.loads((sweep / job / "metrics.json").read_text())["val/loss"]
    assert best.best_value == min(losses.values())
    assert losses[(best.best_params["optim.lr"], best.best_params["prefix.length"])] == best.best_value
    assert (sweep / "report" / "summary.md").is_file()


def test_a_sweep_on_a_metric_the_runs_do_not_have_fails_loudly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", "hparams_search=optuna", "optimized_metric=test/BLUE",
                           "backbone=tiny-gpt2", "init=random", "trainer=cpu", "trainer.enable_progress_bar=false",
                           "trainer.limit_train_batches=1", "optim.epochs=1", "val_generation.enabled=false",
                           "test_after_training=false", "validate_before_training=false", "hydra.sweeper.n_trials=1",
                           f"hydra.sweep.dir={tmp_path / 's'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "optimized_metric=test/BLUE is not among this run's metrics" in proc.stderr


def test_the_report_marks_jobs_that_ran_more_than_once(tmp_path):
    """history.jsonl (one line per command that trained in a job folder) -> jobs.csv's attempts column and a
    list under the table; `attempts` in metrics.json is not averaged as a metric."""
    for job, modes in (("0", ["new"]), ("1", ["new", "resume"]), ("2", ["new", "restart", "resume"])):
        folder = tmp_path / job
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (folder / "metrics.json").write_text(json.dumps({"test/BLEU": 0.5 + int(job) / 10, "attempts": len(modes)}))
        (folder / "history.jsonl").write_text("".join(json.dumps({"attempt": i + 1, "mode": m}) + "\n"
                                                      for i, m in enumerate(modes)))
    r = report([tmp_path], tmp_path / "rep")
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "Jobs that ran more than once" in md
    assert f"- {tmp_path / '1'}: 2 attempts (new, resume)" in md
    assert f"- {tmp_path / '2'}: 3 attempts (new, restart, resume)" in md and f"- {tmp_path / '0'}:" not in md
    jobs = {j["folder"]: j for j in csv.DictReader(open(tmp_path / "rep" / "jobs.csv"))}
    assert [jobs[str(tmp_path / k)]["attempts"] for k in "012"] == ["1", "2", "3"]
    assert abs(r["rows"][0]["test/BLEU"][0] - 0.6) < 1e-12 and "attempts" not in r["rows"][0]
