"""`train(cfg) -> metrics`: the whole flow, as a plain function (train.py is a thin Hydra wrapper).

    backbone = load_backbone(cfg)                 frozen HF model + tokenizer + geometry   (factory.py)
    model    = build_model(cfg, backbone)         method: prefix (static | reparam | apt) | finetune |
                                                  finetune_top2 | adapter | prompt | lora
    init     = initialize(cfg, model)             random | task words | irrelevant words
    data     = PrefixDataModule(cfg.data)         E2E | WebNLG | DART | XSUM (+ lowres, split)
    module   = PrefixTuningModule(...)            LightningModule
    Trainer(cfg.trainer, logger, callbacks).fit(module, data)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from . import atomic, faults
from .artifacts import read_checkpoint
from .callbacks import GenerationValidation, JsonlMetrics
from .checkpoint import RunLock, SafeCheckpointIO, check_writable
from .config_check import ConfigError, check_train_config
from .data.base import DataError
from .data.datamodule import PrefixDataModule, build_dataset, missing_files, preflight_data
from .data.download import download
from .decoding import check_generation_positions
from .errors import as_write_error
from .evaluation import evaluate_model, format_table, select_inputs
from .factory import build_model, initialize, load_backbone, parameter_report
from .gates import probe_gates, write_gate_report
from .lightning_module import PrefixTuningModule
from .metrics import java
from .model import TunedModel
from .nlu import build_task, is_nlu
from .nlu.data import NLUDataModule
from .nlu.evaluation import NLUModule, evaluate_split
from .nlu.tasks import preflight_nlu
from .resume import (HISTORY, INTERRUPTED, PARTIAL, ContinuingCSVLogger, ResumeError, plan_run,
                     set_aside)
from .sharding import PrefixFSDPStrategy, is_sharded, load_trainable_state
from .wandb_run import GateImages, finish_run, run_identity

log = logging.getLogger(__name__)




def check_positions(model: TunedModel, longest: dict[str, int], where: str = "the data") -> None:
    """Positions the method takes (a shifted prefix, a prompt) + longest input must fit in the backbone."""
    geo, taken = model.backbone.geometry, model.method.positions_taken(model.backbone)
    what = model.method.summary()
    for side, n in longest.items():
        if not geo.fits(n + taken):
            if taken:
                msg = (f"{what} takes {taken} positions + longest {side} input {n} tokens in {where} = {n + taken} "
                       f"positions, but backbone {model.backbone.name} has only {geo.max_positions}")
            else:
                msg = (f"longest {side} input in {where} is {n} tokens, but backbone {model.backbone.name} "
                       f"has only {geo.max_positions} positions ({what} takes none here)")
            raise ConfigError(msg + "; shorten the inputs or the prefix, or use a backbone with more positions")


def check_decoding_positions(cfg, model: TunedModel, data: PrefixDataModule) -> None:
    """Before training: every prompt the run will decode (the validation generations and the test after
    training) + decoding.max_new_tokens fits the backbone's positions, so no run fails after its training."""
    planned = []
    vg = cfg.get("val_generation")
    if vg and vg.enabled:
        planned.append((f"val_generation.split={vg.split}", data.eval_groups(vg.split)[: vg.max_inputs]))
    if cfg.get("test_after_training"):
        split = cfg.get("test_split", "test")
        planned.append((f"test_split={split}", select_inputs(data.eval_groups(split), cfg.get("test_max_inputs"),
                                                             cfg.get("test_stride"))))
    for where, groups in planned:
        if not groups:
            continue
        longest = max(len(data.featurizer.prompt_ids(g.source)) for g in groups)
        try:
            check_generation_positions(model, longest, int(cfg.decoding.max_new_tokens))
        except ValueError as err:
            raise ConfigError(f"{where}: {err}; lower decoding.max_new_tokens or data.max_source_tokens, or "
                              f"shorten the prefix (checked before training)") from None


def print_parameter_report(model: TunedModel) -> dict:
    r = parameter_report(model)
    print(f"[params] method={r['method']} ({model.method.summary()}) | trainable {r['trainable_params']:,} = "
          f"{100 * r['trainable_share_of_backbone']:.4f}% of the backbone | frozen backbone {r['frozen_params']:,} "
          f"of {r['backbone_params']:,} ({model.backbone.name}) | for inference {r['inference_params']:,}",
          flush=True)
    return r


def build_logger(cfg, output_dir: Path):
    kind = cfg.logger.kind
    if kind == "csv":  # appends to the run's CSV log on resume instead of deleting it
        return ContinuingCSVLogger(save_dir=str(output_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger  # imports wandb: only when W&B is asked for

        mode = cfg.logger.get("mode") or wandb_mode()
        return WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), **run_identity(cfg),
                           save_dir=str(output_dir), mode=mode, id=wandb_run_id(output_dir), resume="allow",
                           config=OmegaConf.to_container(cfg, resolve=True))
    if kind in (None, "none"):
        return False
    raise ConfigError(f"logger.kind={kind!r} is not one of csv, wandb, none")


def wandb_run_id(output_dir: Path) -> str:
    """One W&B run per run folder: a resume continues the same W&B run instead of starting another."""
    path = output_dir / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:8]  # os entropy: draws nothing from the run's random streams
    atomic.write_text(path, run_id + "\n")
    return run_id


def wandb_mode() -> str:
    """Online only when the user has configured W&B (WANDB_MODE, an API key, or a login in ~/.netrc)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def build_trainer(cfg, output_dir: Path, callbacks=()) -> L.Trainer:
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    ck = cfg.get("checkpoint") or {}
    folder = str(output_dir / "checkpoints")
    # the best checkpoint by the monitored metric (epoch<e>-step<s>.ckpt; used for the test after training)
    best = ModelCheckpoint(dirpath=folder, filename="epoch{epoch}-step{step}", auto_insert_metric_name=False,
                           monitor=ck.get("monitor", "val/loss"), mode=ck.get("mode", "min"), save_last=False,
                           save_top_k=1)
    # last.ckpt: the latest state at every epoch end, what `ckpt_path=last` resumes. Lightning's own
    # save_last refreshes it only when a new best is saved, so once the metric stopped improving it fell
    # behind and a resume silently went back to an older state.
    latest = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    cbs = [best, latest, JsonlMetrics(output_dir / "metrics.jsonl", tcfg.get("log_every_n_steps", 10)), *callbacks]
    logger = build_logger(cfg, output_dir)
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))  # lr-AdamW in the logs, every step
    if tcfg.get("strategy") == "fsdp":  # trainer=fsdp: Lightning's FSDP2 strategy, checkpoints of trainable tensors
        tcfg["strategy"] = PrefixFSDPStrategy()
    return L.Trainer(logger=logger, callbacks=cbs, default_root_dir=str(output_dir), plugins=[SafeCheckpointIO()],
                     **tcfg)


def single_console_logging() -> None:
    """Lightning prints through its own console handler and also propagates to the root logger, where
    Hydra's handler prints the same line again. Under Hydra (root handlers present) keep Hydra's: one line
    on the console, and the same line in the run's train.log."""
    if not logging.getLogger().handlers:
        return

    def console(h):
        return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)

    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or not any(console(h) for h in lg.handlers):
            continue
        lightning = name.split(".")[0] == "lightning"
        if lightning or lg.propagate:  # the root's handler prints these already (or will, for Lightning's)
            for h in [h for h in lg.handlers if console(h)]:
                lg.removeHandler(h)
            if lightning:
                lg.propagate = True  # Lightning turns propagation off when it installs its own handler


def train(cfg: DictConfig, callbacks=()) -> dict:
    """Run one training job; `callbacks` are extra Lightning callbacks (tests, notebooks)."""
    single_console_logging()
    check_train_config(cfg)  # types, ranges and unread keys, before any model is loaded
    output_dir = Path(cfg.paths.output_dir)
    mode, resume_from = plan_run(cfg, output_dir)  # what this command does with the folder, decided untouched
    if mode == "finished":
        return finished_metrics(cfg, output_dir)
    dataset = prepare_data(cfg)  # every file the run reads exists and parses, before any folder or model
    check_writable(output_dir)
    lock = RunLock(output_dir)
    if _global_rank() == 0:  # DDP ranks > 0 share rank 0's folder and lock
        lock.acquire()
    try:
        if _global_rank() == 0:
            for folder in (output_dir, output_dir / "checkpoints"):  # left by a process killed mid-write
                for p in atomic.remove_stale_temporaries(folder):
                    print(f"[run] removed {p}, a partial file of a process killed while writing it", flush=True)
            if mode == "restart":
                moved = set_aside(output_dir)
                print(f"[run] {output_dir} was stopped before its first checkpoint: starting it again from the "
                      f"beginning{f' (the earlier attempt is kept in {moved})' if moved else ''}", flush=True)
            elif mode == "resume" and cfg.get("sweep_resume"):
                print(f"[run] sweep_resume: continuing {output_dir} from its last checkpoint", flush=True)
            done = output_dir / "metrics.json"
            if mode == "resume" and done.is_file():  # a finished run continued with new settings: until it
                kept = done.with_name(f"metrics.before_attempt{attempts(output_dir) + 1}.json")  # finishes
                done.rename(kept)  # again it is not finished; its earlier result is kept under another name
                print(f"[run] {done} of the finished run kept as {kept.name}", flush=True)
            record_attempt(output_dir, mode, resume_from)
        return _train(cfg, list(callbacks) + faults.install(), output_dir, resume_from, dataset)
    except OSError as err:  # a full disk or read-only folder hit by any writer: one sentence with the file
        converted = as_write_error(err, output_dir)
        if converted is err:
            raise
        raise converted from err
    finally:
        lock.release()


def finished_metrics(cfg, output_dir: Path) -> dict:
    """A finished run resumed with its own settings (or a finished job of a resumed sweep): nothing is run or
    written; its metrics.json is returned as it is."""
    done = output_dir / "metrics.json"
    why = "sweep_resume: " if cfg.get("sweep_resume") else ""
    print(f"[run] {why}{output_dir} finished already: skipped (metrics.json kept; resume_allow_changes=true with "
          f"new settings continues it)", flush=True)
    try:
        return json.loads(done.read_text())
    except ValueError as err:
        raise ResumeError(f"{done}: unreadable ({err}); remove it to finish the run again from its last "
                          f"checkpoint") from None


def record_attempt(output_dir: Path, mode: str, resume_from) -> None:
    """history.jsonl: one line per command that trains in this folder; metrics.json counts them ("attempts")."""
    hist = output_dir / HISTORY
    lines = hist.read_text().splitlines() if hist.is_file() else []
    entry = {"attempt": len(lines) + 1, "mode": mode, "from": str(resume_from) if resume_from else None,
             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), "host": socket.gethostname()}
    atomic.write_lines(hist, [*lines, json.dumps(entry)])


def attempts(output_dir: Path) -> int:
    hist = output_dir / HISTORY
    return len(hist.read_text().splitlines()) if hist.is_file() else 0


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _train(cfg: DictConfig, callbacks, output_dir: Path, resume_from, dataset) -> dict:
    if resume_from is None or not (output_dir / "config.yaml").exists():
        atomic.write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # a resume keeps its own
    L.seed_everything(cfg.seed, workers=True)

    backbone = load_backbone(cfg)
    model = build_model(cfg, backbone)
    init_report = initialize(cfg, model)
    nlu = is_nlu(cfg)
    vg = cfg.get("val_generation")
    if nlu:  # an NLU task (nlu/): a task head on the hidden states, scored without decoding
        data = NLUDataModule(cfg.data, dataset, backbone.tokenizer, seed=cfg.seed, lowres=cfg.get("lowres"),
                             output_dir=output_dir)
        splits = ("train", "dev", cfg.get("test_split", "test")) if cfg.get("test_after_training") else ("train", "dev")
        check_positions(model, data.longest(splits), where=f"data={cfg.data.name}")  # tokenizes every split now
    else:
        data = PrefixDataModule(cfg.data, backbone.tokenizer, backbone.is_encoder_decoder, seed=cfg.seed,
                                lowres=cfg.get("lowres"), split=cfg.get("extrapolation"), output_dir=output_dir,
                                dataset=dataset)
        check_positions(model, data.longest(("train", "dev")), where=f"data={cfg.data.name}")
        if cfg.get("test_after_training"):
            preflight_test(cfg, data)
        check_decoding_positions(cfg, model, data)  # loads (and checks) the splits that will be decoded
    report = print_parameter_report(model)

    module = (NLUModule if nlu else PrefixTuningModule)(model, OmegaConf.to_container(cfg.optim, resolve=True),
                                                        run_config=OmegaConf.to_container(cfg, resolve=True))
    signals = StopOnSignal()
    callbacks = [*callbacks, signals, MidEpochCheckpoint(output_dir / "checkpoints" / "last.ckpt", signals)]
    if vg and vg.enabled and not nlu:
        val_decoding = OmegaConf.merge(cfg.decoding, {"num_beams": vg.num_beams})
        callbacks.append(GenerationValidation(data, val_decoding, vg.split, vg.max_inputs, vg.every_n_epochs,
                                              vg.log_samples))
    if not nlu:
        callbacks.append(GateImages(data, output_dir, vg.max_inputs if vg else 50))  # APT + W&B only
    trainer = build_trainer(cfg, output_dir, callbacks)
    rank0 = trainer.global_rank == 0
    partial = output_dir / PARTIAL
    # the metrics known before training (kept across a resume: a resumed run ends with the same keys)
    metrics: dict = json.loads(partial.read_text()) if resume_from is not None and partial.is_file() else {}
    metrics.update({**report, "init": init_report})
    if cfg.get("validate_before_training") and resume_from is None:
        start = trainer.validate(module, datamodule=data, verbose=False)
        metrics["val/loss_start"] = start[0]["val/loss"]
    if rank0:
        atomic.write_json(partial, metrics)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)  # never unpickles code
    except SystemExit as stop:  # SIGTERM (SLURM pre-emption: Lightning's SIGTERMException) or Ctrl-C
        raise interrupted(stop, signals, trainer, output_dir, "training") from None
    if module.shard_report:  # trainer=fsdp: the memory each rank held of the frozen weights
        metrics["fsdp"] = module.shard_report
    for k, v in trainer.callback_metrics.items():  # (empty when the checkpoint had finished training already)
        metrics[k] = float(v)
    ckpt_cb = trainer.checkpoint_callback
    best = (ckpt_cb.best_model_path if ckpt_cb else "") or metrics.get("best_checkpoint") or ""
    metrics["best_checkpoint"] = best or None
    metrics["output_dir"] = str(output_dir)
    if rank0:
        atomic.write_json(partial, metrics)  # training is done: a kill during the test decode resumes with these
    # the test decode: on rank 0; with a sharded backbone (trainer=fsdp) every rank takes part in every forward
    # pass, so all ranks decode the same inputs (as the validation decode does) and rank 0 writes the files
    sharded = is_sharded(module)
    if cfg.get("test_after_training") and (rank0 or sharded) and not trainer.interrupted:
        with signals.during("the test decode"):
            try:
                if rank0 and nlu:
                    metrics.update(run_nlu_test(cfg, module, data, best, output_dir))
                elif rank0:
                    metrics.update(run_test_split(cfg, module, data, best, output_dir))
                else:
                    with tempfile.TemporaryDirectory(prefix="prefixtuning-rank") as scratch:
                        run_test_split(cfg, module, data, best, Path(scratch), primary=False)
            except SystemExit as stop:
                raise interrupted(stop, signals, trainer, output_dir, "the test decode") from None
    if rank0:
        metrics["attempts"] = attempts(output_dir) or 1
        finish_run(trainer, module.model, cfg, metrics, output_dir)  # summary + artifact (W&B only)
        atomic.write_json(output_dir / "metrics.json", metrics)
        (output_dir / INTERRUPTED).unlink(missing_ok=True)  # finished now (a resumed run's earlier interruption)
        partial.unlink(missing_ok=True)
        keys = ("val/loss_start", "val/loss", "train/loss", f"val/{data.dataset.fast_metric_name}",
                *(f"val/{m}" for m in getattr(data.dataset, "metrics", ()) if nlu))
        summary = {k: metrics[k] for k in keys if k in metrics}
        summary.update({k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)})
        print(f"[run] {output_dir}\n[run] final metrics: " + json.dumps(summary), flush=True)
    return metrics


def interrupted(stop: SystemExit, signals: "StopOnSignal", trainer, output_dir: Path, phase: str) -> SystemExit:
    """A signal stopped the run: write interrupted.json (never metrics.json) and exit 143 (SIGTERM) / 130."""
    name = signals.received or ("SIGTERM" if isinstance(stop, SIGTERMException) else "SIGINT")
    code = 143 if name == "SIGTERM" else 130 if name == "SIGINT" else 128 + int(getattr(signal, name, 15))
    last = output_dir / "checkpoints" / "last.ckpt"
    if trainer.global_rank == 0:
        resume = f"python train.py hydra.run.dir={output_dir} ckpt_path=last"
        where = ("no checkpoint was written yet: it starts the run again from the beginning" if not last.is_file()
                 else "it continues from the mid-epoch checkpoint written now" if signals.saved_mid_epoch
                 else "it continues from the last epoch-end checkpoint")
        atomic.write_json(output_dir / INTERRUPTED, {"status": "interrupted", "by": name, "during": phase,
                                                     "global_step": trainer.global_step,
                                                     "epoch": trainer.current_epoch, "resume": resume,
                                                     "checkpoint": where})
        print(f"[run] interrupted by {name} during {phase} at step {trainer.global_step}: no metrics.json (the run "
              f"is not finished); `{resume}` continues it ({where})", flush=True)
    return SystemExit(code)


class StopOnSignal(L.Callback):
    """SIGTERM (what SLURM sends before a pre-emption or at the time limit) and a first Ctrl-C stop training at
    the next batch boundary through Lightning's own SIGTERM handling (SIGTERMException); a second Ctrl-C stops
    at once. During the test decode (after training) either signal stops at once: the decode is redone on
    resume. `received` names the signal."""

    def __init__(self):
        self.received: str | None = None
        self.saved_mid_epoch = False
        self._trainer = None
        self._previous: dict = {}

    def on_fit_start(self, trainer, pl_module):
        self._trainer = trainer
        self._install({signal.SIGTERM: self._graceful, signal.SIGINT: self._graceful})

    def on_fit_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _install(self, handlers: dict) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, fn in handlers.items():
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, fn)

    def _restore(self) -> None:
        for sig, fn in self._previous.items():
            signal.signal(sig, fn)
        self._previous = {}

    def _graceful(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: now
        self.received = self.received or name
        print(f"[run] {name} received: stopping after this batch (Ctrl-C again stops at once)", flush=True)
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)  # Lightning's own: flags the trainer, passes SIGTERM on to its subprocesses
        self._trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException at a boundary

    def _immediate(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def during(self, phase: str):
        self._install({signal.SIGTERM: self._immediate, signal.SIGINT: self._immediate})
        try:
            yield
        finally:
            self._restore()


class MidEpochCheckpoint(L.Callback):
    """When a signal stops training between two batches, the state at that boundary is written to last.ckpt
    (crash-safely), so `ckpt_path=last` continues from that batch, exactly: the data module records how far
    into the epoch the run was and the sampler skips those examples (same order, same RNG streams). Not written
    (the last epoch-end checkpoint stays the one to continue from) during validation, in the middle of a
    gradient accumulation cycle, after the epoch's last batch (the epoch-end checkpoint follows), or with more
    than one process."""

    def __init__(self, path: Path, signals: StopOnSignal):
        self.path, self.signals = Path(path), signals

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        loop = trainer.fit_loop.epoch_loop
        done = loop.batch_progress.current
        n = trainer.num_training_batches
        if (trainer.world_size > 1 or trainer.validating or trainer.sanity_checking or done.completed != done.processed
                or not 0 < done.completed < n or done.completed % trainer.accumulate_grad_batches):
            return
        trainer.save_checkpoint(str(self.path), weights_only=False)  # the full state: optimizer, loops, RNG
        self.signals.saved_mid_epoch = True
        print(f"[run] mid-epoch checkpoint: {self.path} (epoch {trainer.current_epoch}, batch {done.completed} of "
              f"{n})", flush=True)


def run_splits(cfg) -> list[str]:
    """The splits a training run reads: train and dev, the validation generations' split and the test split."""
    splits = ["train", "dev"]
    vg = cfg.get("val_generation")
    if vg and vg.get("enabled"):
        splits.append(vg.split)
    if cfg.get("test_after_training"):
        splits.append(cfg.get("test_split", "test"))
    return list(dict.fromkeys(splits))


def prepare_data(cfg):
    """The dataset of the run with every split it reads checked (data/datamodule.preflight_data). With
    data.download=true, missing official files are fetched first: by global rank 0 only, the other ranks wait
    for the files (so 64 ranks do not fetch at once)."""
    root = cfg.paths.get("data_dir")
    nlu = is_nlu(cfg)
    if cfg.data.get("download") and cfg.data.get("data_dir") is not None:
        name = build_task(cfg.data).source if nlu else cfg.data.name  # NLU tasks: their corpus (superglue, ...)
        if _global_rank() == 0:
            download([name], root=root, progress=False)
        else:
            wait_for_files(build_task(cfg.data) if nlu else build_dataset(cfg.data), run_splits(cfg))
    dataset = preflight_nlu(cfg.data, run_splits(cfg), root=root) if nlu else preflight_data(cfg.data, run_splits(cfg),
                                                                                             root=root)
    check_monitor(cfg, dataset)
    return dataset


def check_monitor(cfg, dataset) -> None:
    """checkpoint.monitor names a metric this run logs (else Lightning fails after the first epoch)."""
    vg = cfg.get("val_generation")
    logged = ["val/loss", "train/loss"]
    if is_nlu(cfg):  # every validation scores the dev split with the task's metrics
        logged += [f"val/{m}" for m in dataset.metrics]
    elif vg and vg.get("enabled"):
        logged.append(f"val/{dataset.fast_metric_name}")
    monitor = (cfg.get("checkpoint") or {}).get("monitor", "val/loss")
    if monitor not in logged:
        hint = "" if len(logged) > 2 or is_nlu(cfg) else f"; val/{dataset.fast_metric_name} needs val_generation.enabled=true"
        raise ConfigError(f"checkpoint.monitor={monitor} is not a metric this run logs ({', '.join(logged)}{hint})")


def wait_for_files(dataset, splits, timeout_s: float = 3600.0) -> None:
    """A rank other than 0 under data.download=true: wait until rank 0 has put every file in place."""
    deadline = time.monotonic() + timeout_s
    while missing_files(dataset, splits):
        if time.monotonic() > deadline:
            raise DataError(f"waited {timeout_s:.0f} s for rank 0 to download {missing_files(dataset, splits)[0]}")
        time.sleep(5.0)


def preflight_test(cfg, data: PrefixDataModule) -> None:
    """Before training: the test split loads, and metrics that cannot be computed here are announced."""
    split = cfg.get("test_split", "test")
    n = len(data.eval_groups(split))
    try:
        java.java()
    except java.MissingDependency as err:
        if data.dataset.task in ("e2e", "webnlg", "dart"):
            print(f"[metrics] warning: METEOR (and E2E ROUGE_L / CIDEr) will be skipped after training: {err}",
                  flush=True)
    print(f"[data] test split {split!r}: {n} inputs", flush=True)


def run_nlu_test(cfg, module, data, best: str, output_dir: Path) -> dict:
    """Score the test split (SuperGLUE: the official validation file) with the best checkpoint's weights;
    predictions_<split>.jsonl, scores_<split>.json and, for APT, the gate heatmap go to the run folder."""
    if best:
        ckpt = read_checkpoint(best)
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"], strict=False)
    split = cfg.get("test_split", "test")
    result = evaluate_split(module.model, data, split, output_dir, max_inputs=cfg.get("test_max_inputs"),
                            show_examples=cfg.get("show_examples", 3))
    print(f"[test] {split} ({'best checkpoint' if best else 'final weights'}, {result['n']} inputs): "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if k != "n"), flush=True)
    return {f"test/{k}": float(v) for k, v in result.items()}


def run_test_split(cfg, module: PrefixTuningModule, data: PrefixDataModule, best: str, output_dir: Path,
                   primary: bool = True) -> dict:
    """Decode the test split with the best checkpoint's prefix (evaluate.py's code path) and score it.
    `primary=False`: another rank of a sharded model, which takes part silently."""
    if best:
        ckpt = read_checkpoint(best)
        module.on_load_checkpoint(ckpt)
        if is_sharded(module):  # full tensors into each rank's shards
            load_trainable_state(module, ckpt["state_dict"])
        else:
            module.load_state_dict(ckpt["state_dict"], strict=False)
    split = cfg.get("test_split", "test")
    result = evaluate_model(module.model, data, split, cfg.decoding, output_dir, batch_size=cfg.decoding.batch_size,
                            progress=primary and bool(cfg.trainer.get("enable_progress_bar", True)),
                            max_inputs=cfg.get("test_max_inputs"),
                            show_examples=cfg.get("show_examples", 3) if primary else 0,
                            stride=cfg.get("test_stride"))
    if not primary:
        return {}
    print(f"[test] {split} ({'best checkpoint' if best else 'final weights'}):\n" + format_table(result), flush=True)
    if module.model.method.gated:  # APT's probe on the test inputs: gates_<split>.csv / .png
        groups = select_inputs(data.eval_groups(split), cfg.get("test_max_inputs"), cfg.get("test_stride"))
        gates = probe_gates(module.model, [data.featurizer.prompt_ids(g.source) for g in groups])
        write_gate_report(gates, module.model.method.gated_prefix(), output_dir, split)
    return {f"test/{k}": v for k, v in result.items()}
