"""Full-precision vs int8 vs int4 frozen backbone (backbone.quantization, torchao weight-only) on the real backbone
(SmolLM2-135M, converted offline), for a prefix train step and greedy decoding, plus the embedded default's
test metrics for each.

    python benchmarks/quantized.py [--repeats 5] [--batch 8] [--dtype float32|bfloat16] [--bleu]

--dtype is the activations' (and the unquantized weights') dtype. On a CPU without native bfloat16 matrix
products (no AVX512-BF16 / AMX) a bfloat16 backward pass is tens of times slower than float32 (measured on the
2-core AMD EPYC of this project: 104 s vs 1.7 s for one batch of 8), so compare in float32 there.

1. Storage: the bytes of the backbone's weights as stored (a quantized weight: its integer data plus its scales).
2. Peak memory: each variant in its own process (load, 3 train steps, one greedy decode): the process's peak
   resident set (ru_maxrss), so the numbers do not mix.
3. Speed: train step (batch 8 of the E2E sample, static prefix P=5, AdamW on the prefix) and greedy decoding
   (batch 8 x 32 new tokens), the variants interleaved (A B C A B C ...) in one process; median, spread,
   ratio to bf16, and the loss of each step on the same batch.
4. --bleu: `python train.py trainer=cpu backbone.quantization=<v>` (the embedded default's recipe) for the
   torchao variants, one run each (n = 1), with its test metrics and wall time.
Variants: none; int8 / int4 through torchao (weight-only, quantized in place after a full-precision load);
bnb-int8 / bnb-int4 through bitsandbytes (LLM.int8 / NF4, loaded straight into quantized storage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

from cpu_bf16 import decode, train_step  # noqa: E402
from prefixtuning.backbone import Backbone  # noqa: E402
from prefixtuning.data.datamodule import PrefixDataModule  # noqa: E402
from prefixtuning.initialization import initialize_prefix  # noqa: E402
from prefixtuning.local_backbones import SMOLLM2_135M_Q4  # noqa: E402
from prefixtuning.model import PrefixTuningModel  # noqa: E402
from prefixtuning.prefixes import build_prefix  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

# torchao (weight-only; full-precision load, then quantized in place) and bitsandbytes (loaded straight into
# quantized storage: LLM.int8 and NF4)
VARIANTS = ("none", "int8", "int4", "bnb-int8", "bnb-int4")
BLEU_VARIANTS = ("none", "int8", "int4")


def backbone_settings(variant: str) -> dict:
    if variant.startswith("bnb-"):
        return {"quantization": variant.removeprefix("bnb-"), "quantization_backend": "bitsandbytes"}
    return {"quantization": variant, "quantization_backend": "torchao"}
ROOT = Path(__file__).resolve().parents[1]


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor subclass: the sum of its inner tensors (data, scales, ...); a
    bitsandbytes NF4 parameter: its packed data plus its block scales."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        n += qs.absmax.numel() * qs.absmax.element_size()
    return n


def model_bytes(model: torch.nn.Module) -> int:
    """Every weight as stored, plus bitsandbytes' int8 row scales (kept on the module, not the parameter)."""
    total, seen = 0, set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in seen:  # a tied weight (embeddings = LM head) once
                seen.add(id(p))
                total += stored_bytes(p)
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


DTYPE = "float32"


def build(variant: str):
    bb = Backbone.load(SMOLLM2_135M_Q4.name, dtype=DTYPE, **backbone_settings(variant))
    torch.manual_seed(0)
    prefix = build_prefix({"kind": "static", "length": 5}, bb.geometry)
    initialize_prefix({"kind": "task_words", "text": "table-to-text:"}, prefix, bb)
    model = PrefixTuningModel(bb, prefix)
    return model, torch.optim.AdamW(prefix.parameters(), lr=5e-3)


def data(batch_size: int, tokenizer):
    conf = ROOT / "conf" / "data"
    cfg = OmegaConf.merge(OmegaConf.load(conf / "e2e.yaml"), OmegaConf.load(conf / "e2e_sample.yaml"))
    cfg.batch_size = batch_size
    dm = PrefixDataModule(cfg, tokenizer, False, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prompts = [dm.featurizer.prompt_ids(g.source) for g in dm.eval_groups("test")[:batch_size]]
    return batch, prompts


def step(model, opt, b) -> float:
    return train_step(model, opt, "fp32", b)  # cpu_bf16's step; "fp32": no autocast, the backbone's own dtype


def one(variant: str, batch_size: int) -> None:
    """--one: this variant alone in this process; prints its peak RSS as JSON."""
    model, opt = build(variant)
    batch, prompts = data(batch_size, model.backbone.tokenizer)
    for _ in range(3):
        step(model, opt, batch)
    decode(model, "fp32", prompts, max_new_tokens=32, min_new_tokens=32)
    weights = model_bytes(model.backbone.model)
    print(json.dumps({"variant": variant, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "weight_mib": weights / 2**20}))


def bleu_runs() -> list[dict]:
    out = []
    for v in BLEU_VARIANTS:
        run = Path(tempfile.mkdtemp(prefix=f"quant-{v}-"))
        t = time.time()
        proc = subprocess.run([sys.executable, "train.py", "trainer=cpu", f"backbone.quantization={v}",
                               f"backbone.dtype={DTYPE}",
                               "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.time() - t
        if proc.returncode != 0:
            out.append({"variant": v, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        m = json.loads((run / "metrics.json").read_text())
        out.append({"variant": v, "wall_s": wall, **{k: m.get(k) for k in (
            "val/loss_start", "val/loss", "test/BLEU", "test/NIST", "test/METEOR", "test/ROUGE_L", "test/CIDEr")}})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bleu", action="store_true", help="also run the embedded default for each variant")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DTYPE
    DTYPE = args.dtype
    if args.one:
        return one(args.one, args.batch)

    memory = {}
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", v, "--batch", str(args.batch), "--dtype", DTYPE],
                              capture_output=True, text=True, check=True)
        memory[v] = json.loads(proc.stdout.strip().splitlines()[-1])

    models = {v: build(v) for v in VARIANTS}
    batch, prompts = data(args.batch, models["none"][0].backbone.tokenizer)
    losses = {v: [] for v in VARIANTS}
    times = {(v, w): [] for v in VARIANTS for w in ("train", "greedy")}
    for _ in range(args.repeats):
        for v in VARIANTS:
            model, opt = models[v]
            t = time.perf_counter()
            losses[v].append(step(model, opt, batch))
            times[(v, "train")].append(time.perf_counter() - t)
            t = time.perf_counter()
            decode(model, "fp32", prompts, max_new_tokens=32, min_new_tokens=32)
            times[(v, "greedy")].append(time.perf_counter() - t)

    print(f"CPU: {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"repeats {args.repeats} (interleaved) | backbone {SMOLLM2_135M_Q4.name}, {DTYPE} activations")
    print(f"train step: batch {args.batch} x {batch['input_ids'].shape[1]} tokens, static prefix P=5; "
          f"greedy: batch {len(prompts)} x 32 new tokens")
    print("| backbone.quantization | weights MiB | peak RSS MiB (own process) | train step s (median, min-max) | "
          "vs none | greedy s | vs none | losses (step 1 .. n, same batch) |")
    print("|---|---|---|---|---|---|---|---|")
    med = {k: statistics.median(t) for k, t in times.items()}
    for v in VARIANTS:
        cells = [f"{memory[v]['weight_mib']:.1f}", f"{memory[v]['peak_rss_mib']:.0f}"]
        for w in ("train", "greedy"):
            t = times[(v, w)]
            cells += [f"{med[(v, w)]:.2f} ({min(t):.2f}-{max(t):.2f})", f"{med[(v, w)] / med[('none', w)]:.2f}"]
        name = f"none ({DTYPE})" if v == "none" else v
        print(f"| {name} | " + " | ".join(cells) + " | " + " ".join(f"{x:.3f}" for x in losses[v]) + " |")
    if args.bleu:
        print("\nembedded default (python train.py trainer=cpu backbone.quantization=<v>), one run each (n = 1):")
        print("| backbone.quantization | wall s | dev loss start -> end | BLEU | NIST | METEOR | ROUGE_L | CIDEr |")
        print("|---|---|---|---|---|---|---|---|")
        for r in bleu_runs():
            if "error" in r:
                print(f"| {r['variant']} | failed: {r['error']} |")
                continue
            f = lambda k: "-" if r.get(k) is None else f"{r[k]:.4f}"  # noqa: E731
            print(f"| {r['variant']} | {r['wall_s']:.0f} | {f('val/loss_start')} -> {f('val/loss')} | {f('test/BLEU')} | "
                  f"{f('test/NIST')} | {f('test/METEOR')} | {f('test/ROUGE_L')} | {f('test/CIDEr')} |")


if __name__ == "__main__":
    main()
