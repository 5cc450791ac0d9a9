"""Every option of every config group composes and builds; backbone geometry and loading errors."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from prefixtuning.nlu import build_task, is_nlu
from prefixtuning.nlu.data import NLUDataModule
from omegaconf import OmegaConf
from transformers import BartConfig, GPT2Config, LlamaConfig

from conftest import ROOT, compose_cfg
from prefixtuning.config_check import ConfigError, check_train_config
from prefixtuning.backbone import BackboneLoadError, Geometry
from prefixtuning.data.datamodule import PrefixDataModule
from prefixtuning.initialization import initialize_prefix
from prefixtuning.training import build_logger, build_model, build_trainer, load_backbone

CONF = ROOT / "conf"


def options(group, with_none: bool = False):
    """The options of a config group; `none` (selected by methods that do not read the group) on request."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if with_none or p.stem != "none")


TINY = [b for b in options("backbone") if b.startswith("tiny-")]
# hub ids with no offline substitute: offline, these must fail at once
HUB = [b for b in options("backbone") if not b.startswith("tiny-")
       and not OmegaConf.load(CONF / "backbone" / f"{b}.yaml").get("offline_substitute")]


def test_groups_are_the_documented_ones():
    assert {"static", "reparam", "apt"} <= set(options("prefix"))
    assert {"random", "task_words", "irrelevant_words"} <= set(options("init"))
    assert {"default", "cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"csv", "wandb"} <= set(options("logger"))
    assert {"tiny-gpt2", "tiny-bart", "tiny-llama", "gpt2", "gpt2-medium", "gpt2-large", "bart-large",
            "smollm2-135m"} <= set(
        options("backbone"))


@pytest.mark.parametrize("backbone", TINY)
@pytest.mark.parametrize("prefix", options("prefix"))
@pytest.mark.parametrize("init", options("init"))
def test_backbone_prefix_init_build(tmp_path, backbone, prefix, init):
    positional = prefix != "memory"  # PrefixMemory takes no positions: no length, no word initialization
    cfg = compose_cfg([f"backbone={backbone}", f"prefix={prefix}", f"init={init}",
                       "prefix.length=3" if positional else "prefix.init_std=0.0",
                       "prefix.mid_dim=16" if prefix == "reparam" else "seed=0",
                       *(["data=rte"] if backbone == "tiny-bert" else [])], tmp_path)  # an encoder: an NLU task
    bb = load_backbone(cfg)
    model = build_model(cfg, bb)
    assert model.prefix.kind == cfg.prefix.kind and model.prefix.length == (3 if positional else 0)
    if not positional and init != "random":
        with pytest.raises(ConfigError, match=f"init={init} fills prefix positions"):
            check_train_config(cfg)
        with pytest.raises(ValueError, match="a memory prefix has none"):
            initialize_prefix(OmegaConf.to_container(cfg.init), model.prefix, bb)
        return
    report = initialize_prefix(OmegaConf.to_container(cfg.init), model.prefix, bb)
    assert report["init"] == init


@pytest.mark.parametrize("data", options("data"))
def test_data_options_build(tmp_path, data):
    cfg = compose_cfg([f"data={data}"], tmp_path)
    if is_nlu(cfg):  # the NLU tasks: their own data module (tests/test_nlu.py reads every one)
        # tiny-bert's small WordPiece vocabulary splits words into many more tokens than a real BERT's
        cfg = compose_cfg([f"data={data}", "data.max_length=512"], tmp_path)
        bb = load_backbone(compose_cfg(["backbone=tiny-bert"], tmp_path))
        task = build_task(cfg.data)
        if not task.path("test").is_file() or not task.path("train").is_file():
            pytest.skip(f"{task.path('train')} is not available here (BoolQ has no train file in the mirror)")
        dm = NLUDataModule(cfg.data, task, bb.tokenizer)
        assert len(dm.features("dev")) > 0 and len(dm.features("test")) > 0
        return
    bb = load_backbone(compose_cfg([], tmp_path))
    dm = PrefixDataModule(cfg.data, bb.tokenizer, False)
    if cfg.data.data_dir:  # the official files: present on this project's machines except where noted
        needed = dm.dataset.data_dir / (cfg.data.files.get("documents") or cfg.data.files.dev)
        if not needed.exists():
            pytest.skip(f"{needed} is not available here (see ../shared/data READMEs)")
    assert len(dm.features("dev")) > 0 and len(dm.eval_groups("test")) > 0


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_build(tmp_path, trainer):
    cfg = compose_cfg([f"trainer={trainer}", "logger=csv"], tmp_path)
    if cfg.trainer.accelerator == "gpu":  # no GPU here: same arguments on the CPU
        cfg.trainer.accelerator = "cpu"
    t = build_trainer(cfg, Path(tmp_path))
    assert isinstance(t, L.Trainer) and t.max_epochs == cfg.optim.epochs


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options_build(tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg([f"logger={logger}"], tmp_path)
    lg = build_logger(cfg, Path(tmp_path))
    expected = {"csv": "ContinuingCSVLogger", "wandb": "WandbLogger"}[cfg.logger.kind]
    assert type(lg).__name__ == expected
    assert Path(lg.save_dir) == Path(tmp_path)  # the run folder, not a logger default


def file_settings(path: Path) -> dict:
    """The dotted keys a global config file sets itself (not its defaults list or Hydra's own settings)."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    flat = {}

    def walk(prefix, n):
        for k, v in n.items():
            if isinstance(v, dict) and v:
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v
    walk("", {k: v for k, v in node.items() if k not in ("defaults", "hydra")})
    return flat


@pytest.mark.parametrize("group,name", [("experiment", n) for n in options("experiment")]
                         + [("debug", n) for n in options("debug")])
def test_a_global_file_composes_and_its_settings_win(tmp_path, group, name):
    """Each experiment / debug file resolves, and every value it sets is the value of the composed config
    (none is overridden by a default that comes after it, nor lost to a typo in a key)."""
    cfg = compose_cfg([f"{group}={name}"], tmp_path)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    settings = file_settings(CONF / group / f"{name}.yaml")
    for key, value in settings.items():
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved above
        got = OmegaConf.select(resolved, key, default="<missing>")
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{group}/{name}.yaml sets {key}={value!r}, the composed config has {got!r}"


@pytest.mark.parametrize("backbone", HUB)
def test_hub_backbones_offline_fail_fast_with_one_sentence(tmp_path, backbone):
    cfg = compose_cfg([f"backbone={backbone}"], tmp_path)
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(cfg)
    msg = str(err.value)
    assert f"could not load backbone {cfg.backbone.name_or_path!r}" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg


def test_geometry_of_real_families():
    g = Geometry.from_config(GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024))  # gpt2-medium
    assert g.sites["decoder"].n_layers == 24 and g.sites["decoder"].head_dim == 64 and g.max_positions == 1024
    b = Geometry.from_config(BartConfig(encoder_layers=12, decoder_layers=12, d_model=1024,
                                        encoder_attention_heads=16, decoder_attention_heads=16))  # bart-large
    assert set(b.sites) == {"encoder", "decoder", "cross"} and b.sites["cross"].n_layers == 12
    assert b.sites["encoder"].head_dim == 64
    q = Geometry.from_config(LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                         num_hidden_layers=16, head_dim=64))
    assert q.sites["decoder"].n_kv_heads == 8 and q.sites["decoder"].n_heads == 32
    assert Geometry.from_dict(q.to_dict()) == q


# ---------------------------------------------------------------- every value checked before any model loads

ALL_OPTIONS = [(g, o) for g in ("backbone", "prefix", "init", "decoding", "data", "optim", "lowres", "extrapolation",
                                "trainer", "logger", "experiment", "debug", "method", "row", "hparams_search")
               for o in options(g)]


def swept(experiment: str, key: str) -> list[str]:
    """The values an experiment file's sweep gives `key` (empty when it does not sweep it)."""
    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").get("hydra", {}).get("sweeper", {})
    value = params.get("params", {}).get(key)
    return str(value).split(",") if value is not None else []


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_shipped_option_passes_the_config_check(tmp_path, group, option):
    rows = swept(option, "row")[:1] if group == "experiment" else []  # a sweep of rows: its first row
    check_train_config(compose_cfg([f"{group}={option}", *(f"row={r}" for r in rows)], tmp_path))


REPLAY_CELLS = [(e, r) for e in options("experiment") if e.startswith("replay_") for r in swept(e, "row")
                or [OmegaConf.load(CONF / "experiment" / f"{e}.yaml").defaults[1]["override /row"]]]


@pytest.mark.parametrize("experiment,row", REPLAY_CELLS)
def test_every_replay_row_takes_the_replay_settings(tmp_path, experiment, row):
    """One row family: a replay job is the paper's row file with conf/recipe_row/<recipe>/<row>.yaml over it
    (recipe replay; the NLU replays' replay_nlu)."""
    cfg = compose_cfg([f"experiment={experiment}", f"row={row}"], tmp_path)
    check_train_config(cfg)
    name = "replay_nlu" if "nlu" in experiment else "replay"
    assert (cfg.recipe.name, cfg.recipe.row) == (name, row)
    recipe = file_settings(CONF / "recipe_row" / name / f"{row}.yaml")
    per_size = f"{row}_{OmegaConf.select(cfg, 'lowres.size')}"
    for key, value in recipe.items():
        if value == "${recipe.lrs.${data.name}}":  # the NLU replays: the lr chosen for the run's task
            value = cfg.recipe.lrs[cfg.data.name]
        if key == "optim.lr" and per_size in (OmegaConf.select(cfg, "recipe.lrs") or {}):
            value = cfg.recipe.lrs[per_size]  # replay_lowdata: the lr chosen on dev at the run's training size
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("row", swept("replay_lowdata", "row"))
def test_low_data_takes_the_lr_chosen_at_each_training_size(tmp_path, row):
    """replay_lowdata: each row's lr per training size (recipe.lrs, chosen on dev at that size); at 200 pairs it is
    the row file's (chosen at 200 by replay_lr); a size without a chosen lr is refused before any work."""
    row_lr = file_settings(CONF / "recipe_row" / "replay" / f"{row}.yaml")["optim.lr"]
    table = OmegaConf.load(CONF / "experiment" / "replay_lowdata.yaml").recipe.lrs
    assert table[f"{row}_200"] == row_lr
    for size in swept("replay_lowdata", "lowres.size"):
        cfg = compose_cfg(["experiment=replay_lowdata", f"row={row}", f"lowres.size={size}"], tmp_path)
        check_train_config(cfg)
        assert cfg.optim.lr == table[f"{row}_{size}"]
    run = subprocess.run([sys.executable, "train.py", "experiment=replay_lowdata", f"row={row}", "lowres.size=100",
                          "hydra.mode=RUN", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 1
    assert (f"optim.lr: recipe.lrs has no learning rate for this run (recipe.row={row}, data.name=e2e, "
            f"lowres.size=100)" in run.stdout + run.stderr), run.stdout[-2000:] + run.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_per_size_lr_table_agrees_with_the_one_chosen_on_dev(tmp_path):
    """A study that reuses a per-size lr (replay_init at 50 pairs) takes the value replay_lowdata chose on dev, for
    every init it sweeps; the two tables cannot drift apart."""
    chosen = OmegaConf.load(CONF / "experiment" / "replay_lowdata.yaml").recipe.lrs
    table = OmegaConf.load(CONF / "experiment" / "replay_init.yaml").recipe.lrs
    assert table and all(table[k] == chosen[k] for k in table), (dict(table), dict(chosen))
    for init in swept("replay_init", "init"):
        cfg = compose_cfg(["experiment=replay_init", f"init={init}"], tmp_path)
        check_train_config(cfg)
        assert (cfg.init.kind, cfg.optim.lr) == (init, chosen["prefix_static_50"])


def test_a_replay_row_without_replay_settings_is_refused_before_any_work(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "experiment=replay_apt", "row=emb", "hydra.mode=RUN",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1
    assert ("recipe=replay has no settings for row=emb: add conf/recipe_row/replay/emb.yaml"
            in run.stdout + run.stderr)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=eight", "data.batch_size='eight' is a str; expected int"),
    ("data.batch_size=0", "data.batch_size=0 is below its minimum 1"),
    ("optim.lr=-1e-3", "optim.lr=-0.001 must be greater than 0"),
    ("prefix.length=2.5", "prefix.length=2.5 is a float; expected int"),
    ("decoding.num_beams=true", "decoding.num_beams=True is a bool; expected int"),
    ("backbone.dtype=float64", "backbone.dtype='float64' is not one of float32, bfloat16, float16, auto"),
    ("+data.bach_size=4", "config key data.bach_size is not read by anything"),
    ("+prefix.mid_dim=64", "config key prefix.mid_dim is read only when prefix.kind is reparam"),
    ("+trainer.max_epoch=3", "config key trainer.max_epoch is not an argument of lightning.Trainer"),
    ("trainer.max_steps=ten", "trainer.max_steps='ten' is a str; expected int"),
    ("+surprise=1", "config key surprise is not read by anything"),
    ("optim.lr=nan", "optim.lr=nan is not a finite number"),
    ("trainer.precision=bf17-mixed", "trainer.precision='bf17-mixed' is not one of"),
    ("checkpoint.monitor=val/BLUE", "checkpoint.monitor=val/BLUE is not a metric this run logs (val/loss, "
                                    "train/loss, val/BLEU)"),
])
def test_bad_values_and_unread_keys_fail_before_any_model_loads(tmp_path, override, message, monkeypatch):
    import prefixtuning.training as training

    monkeypatch.setattr(training, "load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as err:
        training.train(compose_cfg([override], tmp_path / "run"))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.parametrize("overrides,message", [
    (["prefix=none"], "method=prefix needs the prefix/ group, but prefix=none"),
    (["method=lora", "prefix=apt"], "method=lora does not read the prefix/ group, but prefix=apt was set"),
    (["method=finetune", "init=task_words"], "method=finetune does not read the init/ group"),
    (["method=lora", "+method.layers=2"], "config key method.layers is read only when method.kind is finetune_top2"),
    (["method=adapter", "method.share=2.0"], "method.share=2.0 is above its maximum 1"),
])
def test_method_groups_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        check_train_config(compose_cfg(overrides, tmp_path))
    assert message in str(err.value)


@pytest.mark.parametrize("config_name,override,message", [
    ("eval", "+spilt=test", "config key spilt is not read by evaluate.py"),
    ("eval", "split=validation", "split='validation' is not one of train, dev, test"),
    ("eval", "max_inputs=0", "max_inputs=0 is below its minimum 1"),
    ("eval", "decoding.num_beams=two", "decoding.num_beams='two' is a str; expected int"),
    ("export", "format=onnx", "format='onnx' is not one of prefixtuning, peft"),
    ("export", "+outdir=x", "config key outdir is not read by export.py"),
])
def test_evaluate_and_export_configs_are_checked_before_the_checkpoint_loads(tmp_path, config_name, override,
                                                                              message, monkeypatch):
    import prefixtuning.evaluation as evaluation
    import prefixtuning.export as export

    monkeypatch.setattr(evaluation, "load_trained", lambda *a: pytest.fail("a checkpoint was loaded"))
    monkeypatch.setattr(export, "load_trained", lambda *a: pytest.fail("a checkpoint was loaded"))
    required = [f"ckpt={tmp_path / 'x.ckpt'}"] + ([f"out={tmp_path / 'out'}"] if config_name == "export" else [])
    cfg = compose_cfg(required + [override], tmp_path, config_name=config_name)
    run = evaluation.evaluate if config_name == "eval" else export.export_from_config
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert message in str(err.value)


def test_a_missing_required_key_is_named(tmp_path):
    from prefixtuning.export import export_from_config

    with pytest.raises(ConfigError, match="out is required: add out=..."):
        export_from_config(compose_cfg([f"ckpt={tmp_path / 'x.ckpt'}"], tmp_path, config_name="export"))


def test_a_key_of_another_kind_names_the_kinds_that_read_it(tmp_path):
    """Keys are declared by the kinds themselves: a method key under the wrong method names its readers."""
    cfg = compose_cfg(["method=adapter", "+method.rank=4"], tmp_path)
    with pytest.raises(ConfigError, match="config key method.rank is read only when method.kind is lora, but "
                                          "method.kind=adapter"):
        check_train_config(cfg)
    cfg = compose_cfg(["+prefix.mid_dimension=4"], tmp_path)
    with pytest.raises(ConfigError, match=r"config key prefix.mid_dimension is not read by anything \(a typo\?\); "
                                          r"prefix.kind=static reads prefix.length, prefix.sites"):
        check_train_config(cfg)
