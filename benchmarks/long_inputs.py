"""Long inputs: a prefix train step on 2,048-token inputs, this project's prefix with and without gradient
checkpointing (backbone.gradient_checkpointing=true) against HF PEFT's prefix tuning, peak memory and time.

    python benchmarks/long_inputs.py [--tokens 2048] [--batch 1] [--prefix 10] [--steps 2]

Each variant runs alone in its own process (load, `--steps` train steps of AdamW on the prefix, float32):
- ours: static prefix P, injected inside attention (the default);
- ours-gc: the same with the backbone's gradient checkpointing (activations of each block recomputed in the
  backward pass instead of stored);
- peft: `get_peft_model(..., PrefixTuningConfig(num_virtual_tokens=P))` on the same weights;
- peft-gc: PEFT's prefix tuning with `gradient_checkpointing_enable()`: whether PEFT accepts it, and what it
  costs if it does.
Peak = the process's peak resident set (ru_maxrss); "train peak over load" = that peak minus the resident set
right after loading (the step's activations, gradients and optimizer state). The losses of ours and ours-gc on
the same batch must be equal (checkpointing recomputes, it does not approximate): printed beside each row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

VARIANTS = ("ours", "ours-gc", "peft", "peft-gc")


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(variant: str, P: int):
    from prefixtuning.backbone import Backbone
    from prefixtuning.local_backbones import SMOLLM2_135M_Q4

    gc = variant.endswith("-gc")
    bb = Backbone.load(SMOLLM2_135M_Q4.name, dtype="float32", gradient_checkpointing=gc and variant.startswith("ours"))
    torch.manual_seed(0)
    if variant.startswith("ours"):
        from prefixtuning.model import PrefixTuningModel
        from prefixtuning.prefixes import build_prefix

        model = PrefixTuningModel(bb, build_prefix({"kind": "static", "length": P}, bb.geometry))
        model.train()
        return (lambda ids: model(ids, torch.ones_like(ids), labels=ids).loss), list(model.prefix.parameters())
    from peft import PrefixTuningConfig, get_peft_model

    hf = bb.model
    if gc:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    return (lambda ids: hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss), params


def one(variant: str, tokens: int, batch: int, P: int, steps: int) -> dict:
    try:
        loss_fn, params = build(variant, P)
    except Exception as err:  # PEFT refusing a setting is a result to report
        return {"variant": variant, "error": f"{type(err).__name__}: {err}"[:200]}
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, tokens), generator=g)
    loaded = rss_mib()
    losses, times = [], []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            loss = loss_fn(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
    except Exception as err:
        return {"variant": variant, "error": f"{type(err).__name__}: {err}"[:200]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "loaded_mib": loaded, "peak_mib": peak, "train_mib": peak - loaded,
            "step_s": times, "losses": losses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.batch, args.prefix, args.steps)))
        return 0
    rows = []
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", v, "--tokens", str(args.tokens), "--batch",
                               str(args.batch), "--prefix", str(args.prefix), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        rows.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                    {"variant": v, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | SmolLM2-135M, "
          f"float32 | batch {args.batch} x {args.tokens} tokens, prefix P={args.prefix} | {args.steps} steps, "
          f"each variant in its own process")
    print("| variant | peak RSS MiB | train peak over load MiB | vs peft | step s (each) | losses |")
    print("|---|---|---|---|---|---|")
    base = next((r for r in rows if r["variant"] == "peft" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | refused or failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['train_mib'] / base['train_mib']:.2f}" if base else "-"
        print(f"| {r['variant']} | {r['peak_mib']:.0f} | {r['train_mib']:.0f} | {ratio} | "
              f"{' '.join(f'{t:.1f}' for t in r['step_s'])} | {' '.join(f'{x:.4f}' for x in r['losses'])} |")
    ours = {r["variant"]: r for r in rows if "error" not in r}
    if "ours" in ours and "ours-gc" in ours:
        same = ours["ours"]["losses"] == ours["ours-gc"]["losses"]
        print(f"ours and ours-gc losses {'equal' if same else 'DIFFER'}: checkpointing "
              f"{'recomputes exactly' if same else 'changed the numbers'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
