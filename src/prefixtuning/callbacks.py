"""Run-folder outputs: metrics as one JSON line per logging step (beside the resolved config)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import lightning as L
import torch

from . import atomic
from .decoding import decode


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = v.item()
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


class JsonlMetrics(L.Callback):
    """metrics.jsonl: one line per logging step and per validation. A resumed run first drops the lines past
    its checkpoint's step (and the same rows of the CSV log): the part of the run after that checkpoint is run
    again and logged again, so the logs hold each step once, as an uninterrupted run's do."""

    def __init__(self, path: str | Path, every_n_steps: int = 10):
        self.path = Path(path)
        self.every = max(1, int(every_n_steps))
        self._resumed_at: int | None = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._resumed_at = int(checkpoint["global_step"])

    def on_train_start(self, trainer, pl_module):
        if self._resumed_at is not None and trainer.global_rank == 0:
            step, self._resumed_at = self._resumed_at, None
            trim_jsonl(self.path, step)
            for lg in trainer.loggers:
                csv_file = getattr(getattr(lg, "experiment", None), "metrics_file_path", None)
                if csv_file:
                    trim_csv(Path(csv_file), step)

    def _write(self, trainer, stage: str):
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        record = {"stage": stage, "step": trainer.global_step, "epoch": trainer.current_epoch,
                  **_scalars(trainer.callback_metrics)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._write(trainer, "train")

    def on_validation_end(self, trainer, pl_module):
        self._write(trainer, "validate")


def trim_jsonl(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of_json(line) <= step]
    if len(keep) != len(lines):
        atomic.write_lines(path, keep)


def _step_of_json(line: str) -> float:
    try:
        return json.loads(line).get("step", -1)
    except ValueError:
        return float("inf")  # a line cut by a crash: dropped


def trim_csv(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")

    def ok(r):
        try:
            return float(r[col]) <= step
        except (ValueError, IndexError):
            return False

    keep = [rows[0]] + [r for r in rows[1:] if ok(r)]
    if len(keep) != len(rows):
        buf = io.StringIO()
        csv.writer(buf).writerows(keep)  # the csv module's line ends, as Lightning's writer
        atomic.write_text(path, buf.getvalue())


class GenerationValidation(L.Callback):
    """At the end of each validation: decode `max_inputs` dev inputs and log the task's fast metric
    (e.g. `val/BLEU` for E2E) so ModelCheckpoint can monitor it; log sample generations as a W&B table.

    Every DDP rank decodes the same inputs (deterministic), so the logged value is identical everywhere.
    """

    def __init__(self, datamodule, decoding_cfg, split: str = "dev", max_inputs: int = 50,
                 every_n_epochs: int = 1, log_samples: int = 8):
        self.dm, self.decoding_cfg, self.split = datamodule, decoding_cfg, split
        self.max_inputs, self.every, self.log_samples = int(max_inputs), max(1, int(every_n_epochs)), log_samples
        self._groups = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch % self.every:
            return

        if self._groups is None:
            self._groups = self.dm.eval_groups(self.split)[: self.max_inputs]
        prompts = [self.dm.featurizer.prompt_ids(g.source) for g in self._groups]
        hyps = decode(pl_module.model, prompts, self.decoding_cfg, batch_size=self.decoding_cfg.batch_size,
                      progress=False)
        value = self.dm.dataset.fast_metric(self._groups, hyps)
        pl_module.log(f"val/{self.dm.dataset.fast_metric_name}", float(value), prog_bar=True)
        logger = trainer.logger
        if self.log_samples and logger is not None and type(logger).__name__ == "WandbLogger":
            rows = [[g.source, h, g.references[0]] for g, h in list(zip(self._groups, hyps))[: self.log_samples]]
            logger.log_table(key="val/samples", columns=["input", "prediction", "reference"], data=rows,
                             step=trainer.global_step)
