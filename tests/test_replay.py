"""Each replay experiment file (conf/experiment/replay_*.yaml) runs as a user runs it: `python train.py -m
experiment=replay_<name>` as a subprocess, its whole sweep on the tiny backbone and the shipped data samples
with 2 training steps per job, then the report the file's Hydra callback writes. Checked: the exit code, one
job per point of the file's own sweep (read from the file, not repeated here), every job with results,
the swept keys in summary.csv, each study's figure, and the study-specific outputs (seen / unseen WebNLG
subsets, APT gate heatmaps, dev-only learning-rate selection)."""

import csv
import itertools
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

REPLAYS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("replay_*.yaml"))
SMOKE = ["backbone=tiny-gpt2", "trainer.max_steps=2", "trainer.val_check_interval=1",
         "decoding.max_new_tokens=6", "decoding.min_new_tokens=1", "lowres.size=20"]
# the figure (or other file) each study must produce in its report folder
FIGURES = {"replay_lowdata": ["lowdata.png"], "replay_init": ["init.png"], "replay_length": ["prefix_length.png"],
           "replay_apt": ["gates_*.png"], "replay_reparam": [], "replay_extrapolation": [], "replay_lr": [],
           "replay_apt_nlu": ["gates_*.png", "significance.md"], "replay_apt_nlu_lr": [],
           "replay_memory": ["significance.md"]}
# the NLU replays: tiny BERT on the constructed samples of the official formats (every swept task)
NLU_SMOKE = ["backbone=tiny-bert", "trainer.max_steps=2", "trainer.val_check_interval=1", "test_max_inputs=3",
             f"paths.data_dir={ROOT / 'src' / 'prefixtuning' / 'data' / 'samples' / 'nlu'}", "data.max_length=512"]
# fewer replicates than the real study where its sweep is large (the swept dimension itself is kept)
# (one data sample each: mean ± std over replicates is covered by tests/test_report.py)
FEWER = {"replay_lr": ["optim.lr_scale=0.333,3.0"], "replay_apt_nlu": ["seed=0"], "replay_apt_nlu_lr": ["optim.lr_scale=3.0"], **{name: ["lowres.sample=0"] for name in
         ("replay_lowdata", "replay_apt", "replay_reparam", "replay_extrapolation", "replay_init", "replay_length",
          "replay_memory")}}


def sweep_params(name: str, extra: list[str]) -> dict[str, list[str]]:
    params = dict(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params)
    out = {k: [v.strip() for v in str(vs).split(",")] for k, vs in params.items()}
    for o in extra:
        k, v = o.split("=", 1)
        if k in out:
            out[k] = v.split(",")
    return out


def test_every_replay_has_a_smoke_test():
    assert set(REPLAYS) == set(FIGURES), "add the new replay file to FIGURES in tests/test_replay.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", REPLAYS)
def test_replay_multirun_and_report(tmp_path, name):
    data = "webnlg_sample" if name == "replay_extrapolation" else "e2e_sample"
    # 3 test inputs; the extrapolation study keeps its own subset (every 9th: 6 of the sample's 48, 3 unseen)
    swept_here = set(sweep_params(name, []))
    smoke = [o for o in SMOKE if o.split("=", 1)[0] not in swept_here]  # the study's own sweep is kept
    if OmegaConf.select(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml"), "recipe.lrs"):
        smoke = [o for o in smoke if not o.startswith("lowres.size=")]  # its lr table is per training size
    extra = [f"data={data}", *smoke, *FEWER.get(name, [])] + ([] if name == "replay_extrapolation" else
                                                               ["test_max_inputs=3"])
    if name.startswith("replay_apt_nlu"):
        extra = [*NLU_SMOKE, *FEWER.get(name, [])]
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", "-m", f"experiment={name}", *extra, f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    params = sweep_params(name, extra)
    n_jobs = len(list(itertools.product(*params.values())))
    assert f"[report] {n_jobs} jobs (0 without results)" in proc.stdout, proc.stdout[-2000:]
    report = sweep / "report"
    jobs = list(csv.DictReader(open(report / "jobs.csv")))
    assert len(jobs) == n_jobs and all(j["status"] == "ok" for j in jobs)
    # every point of the sweep ran once, with the file's own values
    swept = [k for k, vs in params.items() if len(vs) > 1]
    assert sorted(tuple(j[k] for k in swept) for j in jobs) == sorted(
        itertools.product(*(params[k] for k in swept)))
    summary = list(csv.DictReader(open(report / "summary.csv")))
    by = [k for k in swept if k not in ("lowres.sample", "seed")]
    assert summary and all(k in summary[0] for k in by)
    md = (report / "summary.md").read_text()
    assert all(v in md for k in by for v in params[k]), md
    for pattern in FIGURES[name]:
        assert list(report.glob(pattern)), f"{pattern} missing in {sorted(p.name for p in report.iterdir())}"

    first = jobs[0]
    if name in ("replay_lr", "replay_apt_nlu_lr"):  # dev only: no test scoring, the dev metrics are what the choice reads
        assert not any(k.startswith("test/") and first[k] for k in first)
        assert all(j["val/loss"] for j in jobs)
    elif name == "replay_apt_nlu":  # each task's own test metric
        assert all(j["test/f1"] != "" if j["data"] == "conll04" else j["test/accuracy"] != "" for j in jobs)
    else:
        main = "test/all/BLEU" if name == "replay_extrapolation" else "test/BLEU"
        assert all(j[main] != "" for j in jobs)
    if name == "replay_extrapolation":  # seen and unseen categories scored separately, from one strided subset
        assert all(j["test/seen/BLEU"] != "" and j["test/unseen/BLEU"] != "" for j in jobs)
    if name == "replay_lowdata":
        assert {j["row"] for j in jobs} == {"prefix_static", "ft"}
    compare = OmegaConf.select(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml"),
                               "hydra.callbacks.report.compare")
    if compare:  # the paired tests against the study's baseline, from the same report
        key, value = compare.split("=", 1)
        rows = list(csv.DictReader(open(report / "significance.csv")))
        assert {r[key] for r in rows} == set(params[key]) - {value}, rows
        assert all(r["verdict"] in ("not separable", "not separable (tests disagree)", "differs (p < 0.05)") and r["pairs"] == "1" for r in rows)
        assert "Paired tests against " + compare in (report / "significance.md").read_text()
        # the dev loss, which no per-input test covers, is compared across samples for every row
        across = list(csv.DictReader(open(report / "significance_samples.csv")))
        assert {r[key] for r in across if r["metric"] == "val/loss"} == set(params[key]) - {value}, across
        assert not any(r["metric"].endswith(("/n", "/inputs", "_start")) for r in across), across
        if name == "replay_extrapolation":  # the categories travel in the predictions file: subsets tested per input
            assert {"test/seen/BLEU", "test/unseen/BLEU", "test/unseen/TER"} <= {r["metric"] for r in rows}, rows
            assert "test/unseen/METEOR" in {r["metric"] for r in across}
