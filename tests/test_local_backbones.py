"""Local backbones: building one never changes the run's random stream, says what it is doing, lands in the
one cache every command uses, and `backbone.name_or_path` always decides what is loaded."""

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict

from conftest import compose_cfg
from prefixtuning.backbone import Backbone
from prefixtuning.local_backbones import LOCAL_BACKBONES, build_local, default_cache_dir
from prefixtuning.training import load_backbone, train


def _draws():
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def test_building_a_backbone_keeps_every_random_stream_and_reports_progress(tmp_path, capsys):
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    expected = _draws()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    Backbone.load("tiny-gpt2", cache_dir=str(tmp_path))  # an empty cache: built here, pretrained with torch RNG
    assert _draws() == expected
    out = capsys.readouterr().out
    assert "[backbone] tiny-gpt2: building once into" in out and "pretraining step 300/300" in out
    assert "built in" in out


def test_same_seed_same_numbers_on_a_first_run_and_a_second_run(tmp_path):
    """The first run after a fresh clone builds the backbone after seed_everything; it must draw the same
    prefix initialization and data order as every later run."""
    common = ["trainer=cpu", "trainer.enable_progress_bar=false", "optim.epochs=1", "trainer.limit_train_batches=3",
              "test_after_training=false", "val_generation.enabled=false", "init=random", "logger=csv",
              f"backbone.cache_dir={tmp_path / 'cache'}"]
    first = train(compose_cfg(common, tmp_path / "first"))  # empty cache: the tiny backbone is built now
    assert any((tmp_path / "cache").rglob("DONE"))
    second = train(compose_cfg(common, tmp_path / "second"))  # built already
    keys = ("val/loss_start", "val/loss", "train/loss")
    assert [first[k] for k in keys] == [second[k] for k in keys]
    a = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_name_or_path_overrides_a_local_backbone_config(tmp_path):
    """backbone=tiny-gpt2 with the user's own model directory loads the user's model, not the tiny one."""
    user_dir = build_local("tiny-llama")
    cfg = compose_cfg(["backbone=tiny-gpt2", f"backbone.name_or_path={user_dir}"], tmp_path)
    bb = load_backbone(cfg)
    assert bb.geometry.model_type == "llama" and bb.name == str(user_dir)


def test_one_cache_folder_for_every_command(tmp_path, monkeypatch):
    built = build_local("tiny-gpt2")  # the suite's shared build, loaded by the recording builder below
    monkeypatch.delenv("PREFIXTUNING_CACHE", raising=False)
    home = Path.home() / ".cache" / "prefixtuning"
    assert default_cache_dir() == home
    assert compose_cfg([], tmp_path).paths.cache_dir == str(home)  # train.py / evaluate.py / export.py
    monkeypatch.setenv("PREFIXTUNING_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" == Path(compose_cfg([], tmp_path).paths.cache_dir)
    asked = []

    def record(cache_dir):
        asked.append(cache_dir)
        return built

    monkeypatch.setitem(LOCAL_BACKBONES, "tiny-gpt2", record)
    cfg = compose_cfg([], tmp_path)
    load_backbone(cfg)  # train.py's path
    with open_dict(cfg):
        cfg.backbone.cache_dir = None
    load_backbone(cfg)  # Backbone.load's own default, which the serving CLI uses
    assert asked == [tmp_path / "c", tmp_path / "c"]
