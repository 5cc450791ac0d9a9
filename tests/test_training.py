"""train(cfg) on the real composed config, shrunk: what changes in a step, checkpoints, resume."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_cfg
from prefixtuning.training import ConfigError, build_model, load_backbone, train

SMALL = ["trainer=cpu", "trainer.enable_progress_bar=false", "data.max_train_examples=48",
         "data.max_dev_examples=20", "data.batch_size=16", "logger=csv", "test_after_training=false",
         "val_generation.max_inputs=5"]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_one_step_changes_only_the_prefix(tmp_path):
    from prefixtuning.data.datamodule import PrefixDataModule
    from prefixtuning.lightning_module import PrefixTuningModule

    cfg = compose_cfg(SMALL, tmp_path)
    bb = load_backbone(cfg)
    model = build_model(cfg, bb)
    module = PrefixTuningModule(model, {"lr": 1e-2})
    before_bb = {k: v.clone() for k, v in bb.model.state_dict().items()}
    before_prefix = {k: v.clone() for k, v in model.prefix.state_dict().items()}
    dm = PrefixDataModule(cfg.data, bb.tokenizer, False)
    b = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.prefix.parameters()}
    module.training_step(b, 0).backward()
    opt.step()
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before_bb[k]), f"backbone tensor {k} changed"
    for k, v in model.prefix.state_dict().items():
        assert not torch.equal(v, before_prefix[k]), f"prefix tensor {k} did not change"


def test_loss_is_on_target_tokens_only(tmp_path):
    """The source positions are -100: changing source tokens' labels changes nothing; the loss equals a
    hand computation over target tokens."""
    from prefixtuning.data.datamodule import PrefixDataModule

    cfg = compose_cfg(SMALL, tmp_path)
    bb = load_backbone(cfg)
    model = build_model(cfg, bb).eval()
    dm = PrefixDataModule(cfg.data, bb.tokenizer, False)
    b = next(iter(dm.train_dataloader()))
    assert ((b["labels"] != -100) & (b["source_mask"] == 1)).sum() == 0
    assert model.target_logits_only
    with torch.no_grad():
        fast = model(**b)  # logits only where a target is predicted
        logits = model(b["input_ids"], b["attention_mask"]).logits[:, :-1]  # every position, no labels
        model.target_logits_only = False
        hf = model(**b).loss  # transformers' own causal-LM loss on full logits
    target = b["labels"][:, 1:]
    keep = target != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert fast.logits.shape[1] < logits.shape[1]
    torch.testing.assert_close(fast.loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hf, ref, rtol=1e-6, atol=1e-6)


class StopAfterFirstEpoch(L.Callback):
    """Interrupts a 2-epoch run after its first epoch, as a pre-empted job would be: the SIGTERM flag that
    Lightning's signal handler sets, so the run stops through the same path (exit status 143, no metrics.json).
    (A callback that sets `trainer.should_stop`, like early stopping, ends the run: it is finished.)"""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer._signal_connector.received_sigterm = True


def interrupted_run(cfg) -> dict:
    """train() stopped after its first epoch; the last validation's metrics from metrics.jsonl."""
    with pytest.raises(SystemExit) as stop:
        train(cfg, callbacks=[StopAfterFirstEpoch()])
    assert stop.value.code == 143
    out = Path(cfg.paths.output_dir)
    assert not (out / "metrics.json").exists() and (out / "interrupted.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "validate"][-1]


@pytest.mark.fast
def test_checkpoint_holds_only_prefix_and_resume_is_exact(tmp_path):
    common = SMALL + ["optim.epochs=2", "validate_before_training=false"]
    full = train(compose_cfg(common, tmp_path / "full"))
    first = interrupted_run(compose_cfg(common, tmp_path / "part"))
    # resume in the same run folder with ckpt_path=last (Lightning finds checkpoints/last.ckpt)
    resumed = train(compose_cfg(common + ["ckpt_path=last"], tmp_path / "part"))

    ck_full = _ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")
    ck_res = _ckpt(tmp_path / "part" / "checkpoints" / "last.ckpt")
    keys = set(ck_full["state_dict"])
    assert keys and all(k.startswith("model.method.prefix.") for k in keys), keys
    assert ck_full["prefixtuning"]["backbone"] == "tiny-gpt2"
    assert ck_full["global_step"] == ck_res["global_step"] == 6
    for k in keys:
        assert torch.equal(ck_full["state_dict"][k], ck_res["state_dict"][k]), k
    assert first["val/loss"] != full["val/loss"]
    assert resumed["val/loss"] == full["val/loss"]


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    common = SMALL + ["optim.epochs=1", "validate_before_training=false", "trainer.limit_train_batches=1"]
    train(compose_cfg(common, tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    from prefixtuning.resume import ResumeError

    # refused as a changed setting, before anything is loaded
    with pytest.raises(ResumeError, match="backbone.name_or_path: 'tiny-gpt2' in the run, 'tiny-llama' now"):
        train(compose_cfg(common + ["backbone=tiny-llama", f"ckpt_path={last}"], tmp_path / "b"))
    # and, even when changes are allowed, by the checkpoint's own identity check
    with pytest.raises(Exception, match="trained with backbone 'tiny-gpt2', but this model has 'tiny-llama'"):
        train(compose_cfg(common + ["backbone=tiny-llama", f"ckpt_path={last}", "resume_allow_changes=true"],
                          tmp_path / "b"))


def test_prefix_plus_input_beyond_positions_fails_before_training(tmp_path):
    cfg = compose_cfg(SMALL + ["prefix.length=1000"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert "static prefix, P=1000 takes 1000 positions" in msg and "has only 1024" in msg
    assert not (tmp_path / "checkpoints").exists()


def test_embedded_default_learns(tmp_path):
    """`make train`'s run: the default config, shrunk only by turning off the progress bar."""
    metrics = train(compose_cfg(["trainer=cpu", "trainer.enable_progress_bar=false"], tmp_path))
    assert metrics["val/loss"] < 0.85 * metrics["val/loss_start"], metrics
    assert 0 < metrics["trainable_share_of_backbone"] < 0.01
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") > 3
    assert (tmp_path / "config.yaml").exists()


def test_evaluate_reloads_the_checkpoint_and_repeats_exactly(tmp_path):
    """evaluate.py on a checkpoint of the embedded default: same loss as at the end of training,
    the test at the end of train.py gives the same numbers, and a rerun gives identical numbers."""
    import json

    from prefixtuning.evaluation import evaluate

    metrics = train(compose_cfg(SMALL + ["optim.epochs=1", "validate_before_training=false",
                                         "test_after_training=true"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    runs = [evaluate(compose_cfg([f"ckpt={ckpt}", "split=test", "progress=false"], tmp_path / f"eval{i}",
                                 config_name="eval")) for i in range(2)]
    for a in ("eval0", "eval1"):
        assert json.loads((tmp_path / a / "metrics.json").read_text())["inputs"] == 20
    assert runs[0] == {**runs[1], "checkpoint": runs[0]["checkpoint"]}
    preds = [(tmp_path / a / "predictions_test.txt").read_text() for a in ("eval0", "eval1")]
    assert preds[0] == preds[1] and preds[0].count("\n") == 20
    assert (tmp_path / "eval0" / "references_test.txt").read_text().count("\n\n") == 19
    assert preds[0] == (tmp_path / "run" / "predictions_test.txt").read_text()  # train.py's test: same path
    assert runs[0]["BLEU"] == metrics["test/BLEU"]
    dev = evaluate(compose_cfg([f"ckpt={ckpt}", "split=dev", "progress=false", "max_inputs=3"], tmp_path / "dev",
                               config_name="eval"))
    assert abs(dev["reference_loss"] - metrics["val/loss"]) < 1e-5
    assert "val/BLEU" in metrics


@pytest.mark.slow
def test_ddp_on_cpu_through_the_cli(tmp_path):
    """Two DDP processes (gloo) launched by Lightning from train.py, as on a multi-GPU node."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "ddp"
    cmd = [sys.executable, str(ROOT / "train.py"), "backbone=tiny-gpt2", "trainer=cpu", "trainer.devices=2",
           "+trainer.strategy=ddp", "debug=smoke", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ.copy(), timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["val/loss_start"]
    assert (out / "checkpoints" / "last.ckpt").exists()


def test_validation_logs_task_metric_and_a_wandb_table():
    """GenerationValidation logs val/BLEU and, with a W&B logger, a table of sample generations."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from conftest import make_model
    from prefixtuning.callbacks import GenerationValidation
    from prefixtuning.data.datamodule import PrefixDataModule

    m = make_model("gpt2", length=3)
    dm = PrefixDataModule(OmegaConf.create({"name": "e2e", "data_dir": None, "files": None, "batch_size": 4}),
                          m.backbone.tokenizer, False)
    logged, tables = {}, []

    class WandbLogger:  # stands in for lightning's WandbLogger (matched by class name)
        def log_table(self, **kw):
            tables.append(kw)

    decoding = OmegaConf.create({"num_beams": 1, "min_new_tokens": 1, "max_new_tokens": 6, "length_penalty": 1.0,
                                 "no_newlines": True, "batch_size": 4})
    cb = GenerationValidation(dm, decoding, max_inputs=3, log_samples=2)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, logger=WandbLogger(), global_step=7)
    module = SimpleNamespace(model=m, log=lambda k, v, **kw: logged.__setitem__(k, v))
    cb.on_validation_epoch_end(trainer, module)
    assert set(logged) == {"val/BLEU"} and 0.0 <= logged["val/BLEU"] <= 1.0
    assert tables[0]["columns"] == ["input", "prediction", "reference"] and len(tables[0]["data"]) == 2
    assert tables[0]["step"] == 7


def test_wandb_logger_offline_run(tmp_path, monkeypatch):
    """logger=wandb with no W&B account: the run is logged offline into the run folder."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "run"))
    metrics = train(compose_cfg(SMALL + ["logger=wandb", "optim.epochs=1", "validate_before_training=false",
                                         "trainer.limit_train_batches=2"], tmp_path / "run"))
    runs = list((tmp_path / "run").glob("**/offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb")), list((tmp_path / "run").rglob("*"))[:20]
    assert "val/loss" in metrics


def test_wandb_run_continues_on_resume(tmp_path, monkeypatch):
    """The resumed segment logs into the same W&B run (same id), not a second one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "run"))
    common = SMALL + ["logger=wandb", "validate_before_training=false", "trainer.limit_train_batches=2"]
    train(compose_cfg(common + ["optim.epochs=1"], tmp_path / "run"))
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    import wandb

    wandb.finish()  # the first process ends here
    train(compose_cfg(common + ["optim.epochs=2", "ckpt_path=last", "resume_allow_changes=true"], tmp_path / "run"))
    wandb.finish()
    segments = sorted((tmp_path / "run").glob("**/offline-run-*"))
    assert segments and all(s.name.endswith("-" + run_id) for s in segments), segments
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text().strip() == run_id


def _wandb_records(path):
    """Records of an offline run file (.wandb): a 7-byte header, then the LevelDB log format (32 KiB blocks;
    records of checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield rec
        elif kind in (2, 3):
            buf = (buf if kind == 3 else b"") + chunk


def test_wandb_run_holds_what_a_sweep_needs(tmp_path, monkeypatch):
    """Read back from the offline run file: identity, lr every step, test metrics and parameter counts in the
    summary, APT gate images at each validation, and the trained tensors as an artifact."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "run"))
    small = [o for o in SMALL if not o.startswith(("test_after_training", "logger"))]
    metrics = train(compose_cfg(small + ["test_after_training=true", "logger=wandb", "prefix=apt", "optim.epochs=2",
                                         "trainer.limit_train_batches=2",
                                         "trainer.log_every_n_steps=1",
                                         "val_generation.max_inputs=3", "test_max_inputs=3"], tmp_path / "run"))
    import wandb

    wandb.finish()
    (run_file,) = (tmp_path / "run").glob("**/offline-run-*/*.wandb")
    recs = list(_wandb_records(run_file))
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.job_type == "prefix" and "method=prefix" in run.tags and "prefix=apt" in run.tags
    assert run.display_name.startswith("prefix e2e")
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    assert any(k.startswith("lr-") for h in history for k in h), "no learning rate logged"
    validations = sum("val/loss" in h for h in history)
    assert validations >= 2 and sum(any(k.startswith("val/gates/") for k in h) for h in history) == validations
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["trainable_params"] == metrics["trainable_params"]
    assert summary["test/BLEU"] == metrics["test/BLEU"] and "trainable_share_of_backbone" in summary
    arts = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" and a.name.startswith("prefix-") for a in arts)
    files = {e.path for a in arts for e in a.manifest.contents}
    assert {"prefix.safetensors", "prefix.json"} <= files


def test_debug_fdr_decodes_two_inputs_and_never_starts_java(tmp_path, monkeypatch):
    import prefixtuning.callbacks as callbacks
    import prefixtuning.decoding as decoding
    import prefixtuning.evaluation as evaluation
    from prefixtuning.metrics import java

    monkeypatch.setattr(java, "java", lambda: pytest.fail("debug=fdr started Java"))
    decoded = []
    real = decoding.decode

    def counting(model, prompts, *a, **k):
        decoded.append(len(prompts))
        return real(model, prompts, *a, **k)

    for module in (decoding, callbacks, evaluation):  # every module that decodes holds its own reference
        monkeypatch.setattr(module, "decode", counting)
    metrics = train(compose_cfg(["trainer=cpu", "trainer.enable_progress_bar=false", "debug=fdr"], tmp_path))
    assert decoded == [2] and "val/BLEU" in metrics
    assert not any(k.startswith("test/") for k in metrics)


def test_lr_scale_multiplies_the_step_size_the_optimizer_uses(tmp_path):
    """optim.lr_scale (swept by experiment=replay_lr) reaches AdamW: the first logged learning rate of a
    run with scale 0.25 is a quarter of the run with scale 1, both from the same optim.lr."""
    from prefixtuning.training import train

    first = {}
    for scale in (1.0, 0.25):
        out = tmp_path / str(scale)
        train(compose_cfg([*SMALL, f"optim.lr_scale={scale}", "test_after_training=false"], out))
        lrs = [json.loads(line)["lr-AdamW"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if "lr-AdamW" in json.loads(line)]
        assert lrs, "no learning rate was logged"
        first[scale] = lrs[0]
    assert first[1.0] > 0 and abs(first[0.25] / first[1.0] - 0.25) < 1e-9


def test_select_inputs_takes_every_kth_then_the_first_n():
    from prefixtuning.evaluation import select_inputs

    items = list(range(20))
    assert select_inputs(items) == items
    assert select_inputs(items, stride=9) == [0, 9, 18]
    assert select_inputs(items, max_inputs=2, stride=3) == [0, 3]
    assert select_inputs(items, max_inputs=5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="stride must be >= 1"):
        select_inputs(items, stride=0)


def test_decoding_beyond_positions_fails_before_training(tmp_path, monkeypatch):
    """prompt + decoding.max_new_tokens is checked against the backbone's positions before any training step,
    for the test after training (and the validation generations), not when decoding starts."""
    import lightning as L

    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    cfg = compose_cfg(SMALL + ["decoding.max_new_tokens=1020", "val_generation.enabled=false",
                               "test_after_training=true"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith("test_split=test: decoding needs") and "max_new_tokens 1020" in msg and "has 1024" in msg
    cfg = compose_cfg(SMALL + ["decoding.max_new_tokens=1020", "test_after_training=false"], tmp_path / "v")
    with pytest.raises(ConfigError, match="val_generation.split=dev: decoding needs"):
        train(cfg)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_optim_schedule_reaches_the_scheduler(tmp_path, schedule):
    """optim.schedule: after warm-up, `linear` decays to 0 at the last step, `constant` keeps optim.lr (checked
    against the rate the optimizer logged at every step)."""
    out = tmp_path / schedule
    train(compose_cfg([*SMALL, f"optim.schedule={schedule}", "optim.warmup_steps=1", "optim.lr=0.004",
                       "trainer.log_every_n_steps=1", "test_after_training=false"], out))
    lrs = [json.loads(line)["lr-AdamW"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "lr-AdamW" in json.loads(line)]
    assert len(lrs) >= 3 and lrs[0] == 0.0  # step 0 of a 1-step warm-up
    assert lrs[1] == pytest.approx(0.004, rel=1e-6)  # logged in float32
    if schedule == "constant":
        assert all(x == lrs[1] for x in lrs[1:]), lrs
    else:  # a validation step logs the same rate again, so not strictly
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.5 * lrs[1], lrs
