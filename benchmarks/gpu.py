"""On a CUDA GPU: this project's prefix (SDPA with the lower-right causal bias, and with the explicit mask it
replaced) against HF PEFT's prefix tuning and full fine-tuning, for a train step and for greedy generation,
in bfloat16. Prints medians, peak memory and ratios to PEFT, measured in one run. Without CUDA it says so and
exits 0.

    python benchmarks/gpu.py [--backbone smollm2-135m-instruct-q4_1] [--repeats 10] [--batch 8]

Settings (prefix length P / tokens per input): P=10 / 64, P=200 / 512, P=10 / 2048. Variants:
- ours: static prefix, unpadded batch -> SDPA with `causal_lower_right` (flash / memory-efficient kernels);
- ours-mask: the same with the explicit mask tensor (injection.FAST_PATH = False), the path before;
- peft: `get_peft_model(..., PrefixTuningConfig(num_virtual_tokens=P))` on the same weights;
- full-ft: every weight trains (AdamW), no prefix.
Generation: greedy, 32 new tokens, batch 8, prompts of 64 tokens (the P of each setting).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SETTINGS = ((10, 64), (200, 512), (10, 2048))
VARIANTS = ("ours", "ours-mask", "peft", "full-ft")


def build(variant: str, backbone: str, P: int):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefixtuning import injection
    from prefixtuning.backbone import Backbone
    from prefixtuning.model import PrefixTuningModel
    from prefixtuning.prefixes import build_prefix

    bb = Backbone.load(backbone, dtype="bfloat16")
    if variant in ("ours", "ours-mask"):
        torch.manual_seed(0)
        model = PrefixTuningModel(bb, build_prefix({"kind": "static", "length": P}, bb.geometry)).cuda()
        params = list(model.prefix.parameters())

        def forward(ids, labels=None):
            injection.FAST_PATH = variant == "ours"
            return model(ids, torch.ones_like(ids), labels=labels)

        def generate(ids, n):
            injection.FAST_PATH = variant == "ours"
            return model.generate(ids, torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return forward, generate, params
    hf = AutoModelForCausalLM.from_pretrained(bb.model.name_or_path, dtype=torch.bfloat16).cuda()
    if variant == "peft":
        hf = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    params = [p for p in hf.parameters() if p.requires_grad]

    def forward(ids, labels=None):
        return hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    def generate(ids, n):
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
    return forward, generate, params


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped: no CUDA GPU on this machine (torch.cuda.is_available() is False)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | backbone {args.backbone}, bfloat16 | "
          f"batch {args.batch} | repeats {args.repeats} (median)")
    print("| P / tokens | variant | train step ms | vs peft | peak train GiB | generate 32 ms | vs peft |")
    print("|---|---|---|---|---|---|---|")
    for P, T in SETTINGS:
        rows = {}
        for v in VARIANTS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            forward, generate, params = build(v, args.backbone, P)
            opt = torch.optim.AdamW(params, lr=1e-4)
            ids = torch.randint(100, 1000, (args.batch, T), device="cuda")

            def step():
                loss = forward(ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # warm-up
            train = statistics.median(timed(step, args.repeats)) * 1000
            peak = torch.cuda.max_memory_allocated() / 2**30
            prompt = ids[:, :64]
            with torch.no_grad():
                generate(prompt, 2)
                gen = statistics.median(timed(lambda: generate(prompt, 32), max(3, args.repeats // 3))) * 1000
            rows[v] = (train, peak, gen)
            forward = generate = params = opt = step = None  # free the GPU memory before the next variant
        for v, (train, peak, gen) in rows.items():
            print(f"| {P} / {T} | {v} | {train:.1f} | {train / rows['peft'][0]:.2f} | {peak:.2f} | {gen:.1f} | "
                  f"{gen / rows['peft'][2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
