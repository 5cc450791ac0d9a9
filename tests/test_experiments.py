"""Every experiment file composes, and runs a fast smoke version (tiny backbone, sample data, 2 steps)."""

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg
from prefixtuning.nlu import is_nlu
from prefixtuning.training import train

NLU_SAMPLES = ROOT / "src" / "prefixtuning" / "data" / "samples" / "nlu"

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# the replay files run their whole sweep (every row) end to end in tests/test_replay.py
SINGLE = [e for e in EXPERIMENTS if not e.startswith("replay_")]


def smoke_overrides(cfg) -> list[str]:
    """Swap the real backbone and data for their offline counterparts; keep everything else."""
    if is_nlu(cfg):  # the NLU tasks: tiny BERT on the constructed samples of the official formats
        return ["backbone=tiny-bert", f"paths.data_dir={NLU_SAMPLES}", "data.max_length=512", "trainer=cpu",
                "trainer.enable_progress_bar=false", "trainer.max_steps=2", "trainer.max_epochs=1",
                "trainer.limit_val_batches=2", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1",
                "test_max_inputs=3"]
    tiny = "tiny-bart" if "bart" in cfg.backbone.name_or_path else "tiny-gpt2"
    return [f"backbone={tiny}", f"data={cfg.data.name}_sample", "trainer=cpu", "trainer.enable_progress_bar=false",
            "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=2",
            "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "val_generation.max_inputs=2",
            "test_max_inputs=3", "decoding.max_new_tokens=8", "decoding.min_new_tokens=1"] + (
                ["prefix.mid_dim=16"] if cfg.prefix.kind == "reparam" else [])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_its_sweep(tmp_path, name):
    with_hydra = compose_cfg([f"experiment={name}"], tmp_path)
    OmegaConf.to_container(with_hydra, resolve=True)
    text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"python train.py -m experiment={name}" in text or \
        f"python train.py experiment={name}" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", SINGLE)
def test_experiment_smoke_run(tmp_path, name):
    base = compose_cfg([f"experiment={name}"], tmp_path / "compose")
    cfg = compose_cfg([f"experiment={name}", *smoke_overrides(base)], tmp_path)
    metrics = train(cfg)
    assert metrics["trainable_params"] > 0
    assert any(k.startswith("test/") for k in metrics), metrics
    assert _predictions(tmp_path).read_text().count("\n") == 3


def _predictions(folder):
    """The test predictions file: one line per input (the NLU tasks write only the .jsonl)."""
    txt = folder / "predictions_test.txt"
    return txt if txt.is_file() else folder / "predictions_test.jsonl"


def _rows(name: str) -> list[str]:
    params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").get("hydra", {}).get("sweeper", {})
    rows = (params.get("params") or {}).get("row")
    return [r.strip() for r in str(rows).split(",")] if rows else []


ROWS = [(name, row) for name in SINGLE for row in _rows(name)]


@pytest.mark.slow
@pytest.mark.parametrize("name,row", ROWS, ids=[f"{n}-{r}" for n, r in ROWS])
def test_every_row_of_every_experiment_smoke_runs(tmp_path, name, row):
    """The baselines of each table: each swept row trains, tests and reports its trainable share."""
    base = compose_cfg([f"experiment={name}", f"row={row}"], tmp_path / "compose")
    cfg = compose_cfg([f"experiment={name}", f"row={row}", *smoke_overrides(base)], tmp_path)
    metrics = train(cfg)
    assert metrics["method"] == cfg.method.kind and metrics["trainable_params"] > 0
    assert _predictions(tmp_path).read_text().count("\n") == 3
