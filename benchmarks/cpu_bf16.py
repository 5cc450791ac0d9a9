"""fp32 vs bf16 on CPU, on the real backbone (SmolLM2-135M, converted offline), for a prefix train step and
for decoding. Variants, measured interleaved (A B C A B C ...) in one process, median and spread printed:

  fp32          float32 weights, no autocast                       (trainer.precision=32-true)
  bf16-mixed    float32 weights, torch.autocast("cpu", bfloat16)   (trainer.precision=bf16-mixed)
  bf16-weights  bfloat16 frozen backbone + autocast; the prefix stays float32
  bf16          bfloat16 frozen backbone, no autocast; the prefix stays float32 and is cast to bfloat16
                where it enters attention (backbone.dtype=bfloat16, the embedded default)

    python benchmarks/cpu_bf16.py [--repeats 5] [--batch 8]

The train step is a real batch of the E2E sample (batch 8, a static prefix P=5, AdamW on the prefix).
Decoding is greedy, 32 new tokens, batch 8 (the prefix injected), plus beam 5 on 2 inputs.
The loss of each variant on the same batch is printed, to show the cheaper arithmetic keeps the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

from prefixtuning.backbone import Backbone  # noqa: E402
from prefixtuning.data.datamodule import PrefixDataModule  # noqa: E402
from prefixtuning.decoding import pad_prompts  # noqa: E402
from prefixtuning.initialization import initialize_prefix  # noqa: E402
from prefixtuning.local_backbones import SMOLLM2_135M_Q4  # noqa: E402
from prefixtuning.model import PrefixTuningModel  # noqa: E402
from prefixtuning.prefixes import build_prefix  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

VARIANTS = ("fp32", "bf16-mixed", "bf16-weights", "bf16")


def build(variant: str, train_batch):
    dtype = "bfloat16" if variant in ("bf16-weights", "bf16") else "float32"
    bb = Backbone.load(SMOLLM2_135M_Q4.name, dtype=dtype)
    torch.manual_seed(0)
    prefix = build_prefix({"kind": "static", "length": 5}, bb.geometry)
    initialize_prefix({"kind": "task_words", "text": "table-to-text:"}, prefix, bb)
    model = PrefixTuningModel(bb, prefix)
    opt = torch.optim.AdamW(prefix.parameters(), lr=5e-3)
    return model, opt


def autocast(variant: str):
    if variant in ("fp32", "bf16"):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train_step(model, opt, variant, b) -> float:
    model.train()
    with autocast(variant):
        loss = model(b["input_ids"], b["attention_mask"], labels=b["labels"], source_mask=b.get("source_mask")).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def decode(model, variant, prompts, **kw) -> int:
    model.eval()
    tok = model.backbone.tokenizer
    ids, mask = pad_prompts(prompts, tok.pad_token_id, False)
    with autocast(variant):
        out = model.generate(ids, mask, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return out.numel()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    probe = Backbone.load(SMOLLM2_135M_Q4.name)
    data_cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "data", "e2e_sample.yaml"))
    data_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "data",
                                                           "e2e.yaml")), data_cfg)
    data_cfg.batch_size = args.batch
    dm = PrefixDataModule(data_cfg, probe.tokenizer, False, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    groups = dm.eval_groups("test")[: args.batch]
    prompts = [dm.featurizer.prompt_ids(g.source) for g in groups]
    del probe

    models = {v: build(v, batch) for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    times = {(v, w): [] for v in VARIANTS for w in ("train", "greedy", "beam5")}
    for _ in range(args.repeats):
        for v in VARIANTS:
            model, opt = models[v]
            t = time.perf_counter()
            losses[v].append(train_step(model, opt, v, batch))
            times[(v, "train")].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode(model, v, prompts, max_new_tokens=32, min_new_tokens=32)
            times[(v, "greedy")].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode(model, v, prompts[:2], max_new_tokens=32, min_new_tokens=32, num_beams=5)
            times[(v, "beam5")].append(time.perf_counter() - t)

    print(f"CPU: {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"repeats {args.repeats} (interleaved) | backbone {SMOLLM2_135M_Q4.name}")
    print(f"train step: batch {args.batch} x {batch['input_ids'].shape[1]} tokens, static prefix P=5; "
          f"greedy: batch {len(prompts)} x 32 new tokens; beam5: 2 inputs x 32 new tokens")
    print("| variant | train step s (median, min-max) | vs fp32 | greedy s | vs fp32 | beam5 s | vs fp32 | "
          "losses (step 1 .. n, same batch) |")
    print("|---|---|---|---|---|---|---|---|")
    med = {k: statistics.median(t) for k, t in times.items()}
    for v in VARIANTS:
        cells = []
        for w in ("train", "greedy", "beam5"):
            t = times[(v, w)]
            cells += [f"{med[(v, w)]:.2f} ({min(t):.2f}-{max(t):.2f})", f"{med[(v, w)] / med[('fp32', w)]:.2f}"]
        print(f"| {v} | " + " | ".join(cells) + " | " + " ".join(f"{x:.3f}" for x in losses[v]) + " |")


if __name__ == "__main__":
    main()
