"""Predictions of an NLU model on a split, scored with the task's metrics (nlu/metrics.py), and the Lightning module
that trains it (the generation module's optimizer, checkpoints, resume and data-parallel loss; its own validation:
loss and the task metric on the dev split every validation, no decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import atomic
from ..gate_report import write_gate_report
from ..lightning_module import PrefixTuningModule
from . import metrics as M
from .tasks import NLURecord, NLUTask


def word_predictions(pred: torch.Tensor, word_index: torch.Tensor) -> list[list[int]]:
    """Tagging: each sentence's predicted label per word (at the word's first sub-token)."""
    out = []
    for p, w in zip(pred.tolist(), word_index.tolist()):
        words = {wi: pi for pi, wi in zip(p, w) if wi >= 0}
        out.append([words[i] for i in range(len(words))])
    return out


def score(task: NLUTask, records: list[NLURecord], preds: list) -> dict[str, float]:
    """The task's metrics for predictions (label indices; tagging: a list of label indices per word)."""
    if task.kind == "tagging":
        gold = [list(r.meta.get("gold") or [task.labels[t] for t in r.tags]) for r in records]
        return M.entity_scores(gold, [[task.labels[i] for i in p] for p in preds])
    gold = [r.label for r in records]
    if task.name == "multirc":
        return M.multirc(gold, preds, [r.group for r in records])
    out = {"accuracy": M.accuracy(gold, preds)}
    if "f1_macro" in task.metrics:
        out["f1_macro"] = M.f1_macro(gold, preds, len(task.labels))
    return out


@torch.no_grad()
def predict(model, loader, gates: dict | None = None) -> list:
    """Predictions in the loader's order. `gates` (a dict): APT's token gates of every input are collected
    into it, (site, layer) -> (N, P) (multiple choice: N x choices rows)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out: list = []
    parts: dict = {}
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            pred = model.predict(batch).cpu()
            out.extend(word_predictions(pred, batch["word_index"].cpu()) if "word_index" in batch else pred.tolist())
            if gates is not None:
                for k, g in model.method.gated_prefix().last_token_gates.items():
                    parts.setdefault(k, []).append(g.float().cpu())
    finally:
        model.train(was)
        model.method.deactivate(model.backbone)
    if gates is not None:
        gates.update({k: torch.cat(v) for k, v in parts.items()})
    return out


def evaluate_split(model, data, split: str, output_dir: Path | None, max_inputs: int | None = None,
                   show_examples: int = 0) -> dict[str, float]:
    """Score `split` (the first `max_inputs` records) and write predictions_<split>.jsonl (one line per record:
    where it is in the official file, gold, prediction) and scores_<split>.json."""
    task, records = data.dataset, data.records(split)
    features = data.features(split)
    if max_inputs:
        records, features = records[:max_inputs], features[:max_inputs]
    loader = torch.utils.data.DataLoader(features, batch_size=data.cfg.get("eval_batch_size", data.cfg.batch_size),
                                         shuffle=False, collate_fn=data.collate)
    gates = {} if model.method.gated else None
    preds = predict(model, loader, gates)
    result = score(task, records, preds)
    result["n"] = len(records)
    if output_dir is not None:
        lines = [json.dumps({"where": r.where, "gold": _gold(task, r), "pred": _named(task, p)})
                 for r, p in zip(records, preds)]
        atomic.write_lines(Path(output_dir) / f"predictions_{split}.jsonl", lines)
        atomic.write_json(Path(output_dir) / f"scores_{split}.json", result)
        if gates:  # APT: the gate heatmap of this split (gates_<split>.csv / .png), as for the generation tasks
            write_gate_report(gates, model.method.gated_prefix(), Path(output_dir), split)
    for r, p in list(zip(records, preds))[:show_examples]:
        print(f"[example] {r.where}\n  gold: {_gold(task, r)}\n  pred: {_named(task, p)}", flush=True)
    return result


def _named(task, label):
    """A label index (tagging: a list of them) as the task's label name(s)."""
    return [task.labels[i] for i in label] if task.kind == "tagging" else task.labels[label]


def _gold(task, r: NLURecord):
    return _named(task, list(r.tags) if task.kind == "tagging" else r.label)


class NLUModule(PrefixTuningModule):
    """Training as PrefixTuningModule; validation: val/loss (a mean over inputs, tagging: over labelled tokens)
    and val/<metric> for each of the task's metrics, on the whole dev split, every validation."""

    _said_partial = False

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_preds: list = []

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        n = out.loss_tokens
        self._val_sums += torch.stack([out.loss.detach() * n, n.to(out.loss.dtype)]).to(self._val_sums.dtype)
        pred = out.logits.argmax(-1).cpu()
        self._val_preds.extend(word_predictions(pred, batch["word_index"].cpu()) if "word_index" in batch
                               else pred.tolist())

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        data = self.trainer.datamodule
        records = data.records("dev")
        if len(self._val_preds) < len(records) and not self.trainer.sanity_checking and not self._said_partial:
            print(f"[val] trainer.limit_val_batches: val metrics over the first {len(self._val_preds)} of the "
                  f"{len(records)} dev inputs", flush=True)
            self._said_partial = True
        for k, v in score(data.dataset, records[:len(self._val_preds)], self._val_preds).items():
            self.log(f"val/{k}", float(v), prog_bar=k == data.dataset.main_metric)
