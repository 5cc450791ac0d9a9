"""Decode a split with a trained prefix and score it with the task's official metrics.

`evaluate_model` is the one code path for the test at the end of train.py and for evaluate.py; it
writes, in `out_dir`: predictions_<split>.txt (one output per input, official order), predictions_<split>.jsonl
(input, prediction and references per line, for reading),
references_<split>.txt (the official scorer's format) and returns the metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import atomic
from .config_check import check_eval_config
from .data.datamodule import PrefixDataModule
from .data.features import IGNORE
from .decoding import decode
from .loading import load_trained
from .nlu.data import NLUDataModule
from .nlu.evaluation import evaluate_split
from .nlu.model import NLUModel
from .nlu.tasks import preflight_nlu


@torch.no_grad()
def reference_loss(model, loader) -> dict:
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = model(**batch).loss
        n = int((batch["labels"] != IGNORE).sum())
        total += loss.item() * n
        tokens += n
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": tokens}


def print_examples(groups, hyps: list[str], n: int, split: str) -> None:
    """The first `n` inputs of a split beside their predictions (and the first reference), for a person."""
    for i, (g, h) in enumerate(zip(groups[:n], hyps[:n])):
        print(f"[{split} {i}] input:      {g.source}\n[{split} {i}] prediction: {h}\n"
              f"[{split} {i}] reference:  {g.references[0] if g.references else ''}", flush=True)


def select_inputs(groups: list, max_inputs: int | None = None, stride: int | None = None) -> list:
    """The evaluation inputs a run decodes: every `stride`-th input in the official order (1, 2, ...: a
    subset that follows the split's mix, e.g. WebNLG's seen and unseen categories), then the first
    `max_inputs` of those. The same for train.py's test pass, evaluate.py and the gate probe."""
    stride = 1 if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    groups = list(groups)[::stride]
    return groups[: int(max_inputs)] if max_inputs else groups


def evaluate_model(model, dm: PrefixDataModule, split: str, decoding_cfg, out_dir: str | Path,
                   batch_size: int = 16, progress: bool = True, max_inputs: int | None = None,
                   show_examples: int = 0, stride: int | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = select_inputs(dm.eval_groups(split), max_inputs, stride)
    prompts = [dm.featurizer.prompt_ids(g.source) for g in groups]
    hyps = decode(model, prompts, decoding_cfg, batch_size=batch_size, progress=progress, desc=f"decoding {split}",
                  fault_point="test_decode")
    hyps = [" ".join(h.split("\n")) for h in hyps]  # one output per line, whatever the decoder produced
    atomic.write_text(out_dir / f"predictions_{split}.txt", "\n".join(hyps) + "\n")
    atomic.write_lines(out_dir / f"predictions_{split}.jsonl",  # for a person to read
                       (json.dumps({"index": i, "input": g.source, "prediction": h, "references": list(g.references),
                                    **({"meta": g.meta} if g.meta else {})},  # e.g. WebNLG's category (report)
                                   ensure_ascii=False, default=str) for i, (g, h) in enumerate(zip(groups, hyps))))
    print_examples(groups, hyps, show_examples, split)
    dm.dataset.write_references(groups, out_dir / f"references_{split}.txt")
    result = dm.dataset.score(groups, hyps)
    metrics = {"split": split, "inputs": len(groups), **result["scores"]}
    if result["skipped"]:
        metrics["skipped"] = result["skipped"]
        for reason in result["skipped"].values():
            print(f"[metrics] {reason}", flush=True)
    return metrics


def format_table(metrics: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items() if k != "skipped"]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def eval_device(name: str | None) -> torch.device:
    """evaluate.py's `device`: auto = the GPU when CUDA has one, else the CPU; a device that is not there is
    an error naming the field, not a silent fall-back."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} (eval.yaml): not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} (eval.yaml): this machine has no CUDA GPU; use device=cpu or auto")
    return device


def evaluate(cfg) -> dict:
    check_eval_config(cfg)  # types, ranges and unread keys, before the checkpoint is loaded
    device = eval_device(cfg.get("device"))
    model, run_cfg = load_trained(cfg.ckpt)
    model.to(device)
    data_cfg = run_cfg.data
    if cfg.get("data_dir") is not None:
        data_cfg = OmegaConf.merge(data_cfg, {"data_dir": cfg.data_dir})
    out = Path(cfg.paths.output_dir)
    if isinstance(model, NLUModel):  # an NLU task: the head's labels scored with the task's metrics
        print(f"[eval] scoring data={data_cfg.name} {cfg.split} on {device}", flush=True)
        dm = NLUDataModule(data_cfg, preflight_nlu(data_cfg, [cfg.split]), model.backbone.tokenizer,
                           seed=run_cfg.get("seed", 0), lowres=run_cfg.get("lowres"))
        metrics = {"checkpoint": str(cfg.ckpt), **evaluate_split(model, dm, cfg.split, out, cfg.get("max_inputs"),
                                                                  cfg.get("show_examples", 3))}
        atomic.write_json(out / "metrics.json", metrics)
        print(f"[eval] {out}\n" + format_table(metrics), flush=True)
        return metrics
    print(f"[eval] decoding on {device}", flush=True)
    dm = PrefixDataModule(data_cfg, model.backbone.tokenizer, model.backbone.is_encoder_decoder,
                          seed=run_cfg.get("seed", 0), lowres=run_cfg.get("lowres"), split=run_cfg.get("extrapolation"))
    loader = torch.utils.data.DataLoader(dm.features(cfg.split), batch_size=cfg.decoding.batch_size,
                                         shuffle=False, collate_fn=dm.collate)
    metrics = {"checkpoint": str(cfg.ckpt)}
    metrics.update(evaluate_model(model, dm, cfg.split, cfg.decoding, out, batch_size=cfg.decoding.batch_size,
                                  progress=cfg.get("progress", True), max_inputs=cfg.get("max_inputs"),
                                  show_examples=cfg.get("show_examples", 3), stride=cfg.get("stride")))
    metrics.update({f"reference_{k}": v for k, v in reference_loss(model, loader).items()})
    atomic.write_json(out / "metrics.json", metrics)
    print(f"[eval] {out}\n" + format_table(metrics), flush=True)
    return metrics
