"""Side-by-side measurements on this machine (ratios from one run; not tests).

    python benchmarks/prefix_benchmarks.py            # all three
    python benchmarks/prefix_benchmarks.py train      # train step: ours vs HF PEFT vs full fine-tuning
    python benchmarks/prefix_benchmarks.py generate   # tokens/s with a prefix vs without
    python benchmarks/prefix_benchmarks.py mixed      # 16 prefixes: one mixed batch vs 16 sequential calls

Backbone: GPT-2 small shape (12 layers, 768 wide, 12 heads, 50,257 vocabulary), randomly initialized.
Train step: batch 8, length 64 (32 source tokens with the loss masked, 32 target tokens, as in
table-to-text data), P = 10, AdamW, forward + backward + optimizer step; median of 8 steps after 2
warm-up steps; peak memory is the peak resident set of a fresh process per variant. Prompts for
generation come from the E2E sample, tokenized with the tiny tokenizer (ids < 1,000, valid for the
50,257-entry embedding).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _batch(B=8, T=64, source=32):
    """As in prefix-tuning data: the first `source` tokens are the input (loss masked), the rest the target."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :source] = -100
    return ids, torch.ones_like(ids), labels


def _time_steps(step, n=8, warmup=2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_variant(variant: str) -> dict:
    """One variant in this process: median seconds per step and peak RSS (MB)."""
    model = gpt2_small()
    ids, mask, labels = _batch()
    if variant == "ours":
        from prefixtuning.backbone import Backbone
        from prefixtuning.model import PrefixTuningModel
        from prefixtuning.prefixes import build_prefix
        from prefixtuning.local_backbones import build_local
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(build_local("tiny-gpt2"))
        bb = Backbone(model, tok, "gpt2-small-random")
        prefix = build_prefix({"kind": "static", "length": 10}, bb.geometry)
        net = PrefixTuningModel(bb, prefix).train()
        params = list(prefix.parameters())

        def forward():
            return net(ids, mask, labels=labels, source_mask=mask).loss
    elif variant == "peft":
        from peft import PrefixTuningConfig, get_peft_model

        net = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)).train()
        params = [p for p in net.parameters() if p.requires_grad]

        def forward():
            return net(input_ids=ids, attention_mask=mask, labels=labels).loss
    elif variant == "full":
        net = model.train()
        params = list(net.parameters())

        def forward():
            return net(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        raise ValueError(variant)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = _time_steps(step)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "sec_per_step": sec, "peak_rss_mb": peak_mb,
            "trainable": sum(p.numel() for p in params)}


def bench_train() -> dict:
    rows = {}
    for v in ("ours", "peft", "full"):
        out = subprocess.run([sys.executable, __file__, "_train_variant", v], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        rows[v] = json.loads(out)
    o, p, f = rows["ours"], rows["peft"], rows["full"]
    print("train step (GPT-2 small shape, batch 8, length 64, P=10):")
    for r in rows.values():
        print(f"  {r['variant']:<5} {r['sec_per_step'] * 1000:8.1f} ms/step  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"trainable {r['trainable']:,}")
    res = {"ours_vs_peft_time": o["sec_per_step"] / p["sec_per_step"],
           "ours_vs_full_time": o["sec_per_step"] / f["sec_per_step"],
           "ours_vs_peft_peak_rss": o["peak_rss_mb"] / p["peak_rss_mb"],
           "ours_vs_full_peak_rss": o["peak_rss_mb"] / f["peak_rss_mb"]}
    print(f"  time ratio ours/PEFT {res['ours_vs_peft_time']:.3f} (target <= 0.95), "
          f"ours/full FT {res['ours_vs_full_time']:.3f} (target <= 0.60)")
    print(f"  peak RSS ratio ours/PEFT {res['ours_vs_peft_peak_rss']:.3f}, "
          f"ours/full FT {res['ours_vs_full_peak_rss']:.3f}")
    return res


def _backbone():
    from prefixtuning.backbone import Backbone
    from prefixtuning.local_backbones import build_local
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_local("tiny-gpt2"))
    return Backbone(gpt2_small().eval(), tok, "gpt2-small-random")


def _sources(n):
    from prefixtuning.data.e2e import E2EData

    groups = E2EData().eval_groups("test")
    return [groups[i % len(groups)].source for i in range(n)]


def bench_generate() -> dict:
    from prefixtuning.model import PrefixTuningModel
    from prefixtuning.prefixes import build_prefix
    from prefixtuning.data.features import Featurizer
    from prefixtuning.decoding import pad_prompts

    bb = _backbone()
    torch.manual_seed(0)
    m = PrefixTuningModel(bb, build_prefix({"kind": "static", "length": 10}, bb.geometry)).eval()
    f = Featurizer(bb.tokenizer, False)
    ids, mask = pad_prompts([f.prompt_ids(s) for s in _sources(8)], bb.tokenizer.pad_token_id, False)
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=bb.tokenizer.pad_token_id)

    def with_prefix():
        m.generate(ids, mask, **kw)

    def without():
        bb.injector.deactivate()
        with torch.no_grad():
            bb.model.generate(input_ids=ids, attention_mask=mask, **kw)

    t_plain = _time_steps(without, n=3, warmup=1)
    t_prefix = _time_steps(with_prefix, n=3, warmup=1)
    tokens = 8 * 64
    res = {"tokens_per_s_plain": tokens / t_plain, "tokens_per_s_prefix": tokens / t_prefix,
           "ratio": t_plain / t_prefix}
    print(f"greedy generation, batch 8 x 64 new tokens: no prefix {res['tokens_per_s_plain']:.0f} tok/s, "
          f"P=10 {res['tokens_per_s_prefix']:.0f} tok/s, ratio {res['ratio']:.3f} (target >= 0.95)")
    return res


def bench_mixed() -> dict:
    from prefixtuning.prefixes import build_prefix
    from prefixtuning.serving import PrefixBank

    bb = _backbone()
    bank = PrefixBank(bb)
    torch.manual_seed(0)
    for i in range(16):
        bank.add(f"user{i}", build_prefix({"kind": "static", "length": 10}, bb.geometry))
    texts, ids = _sources(16), [f"user{i}" for i in range(16)]
    kw = dict(max_new_tokens=32, min_new_tokens=32, num_beams=1, do_sample=False)

    def batched():
        bank.generate(texts, ids, **kw)

    def sequential():
        for t, p in zip(texts, ids):
            bank.generate([t], [p], **kw)

    t_b = _time_steps(batched, n=3, warmup=1)
    t_s = _time_steps(sequential, n=1, warmup=1)
    res = {"batched_s": t_b, "sequential_s": t_s, "throughput_ratio": t_s / t_b}
    print(f"16 requests, 16 different prefixes, 32 new tokens each: one mixed batch {t_b:.2f} s, "
          f"16 sequential calls {t_s:.2f} s, throughput x{res['throughput_ratio']:.2f} (target >= 4)")
    return res


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "_train_variant":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        print(json.dumps(train_variant(sys.argv[2])))
        return
    which = sys.argv[1:] or ["train", "generate", "mixed"]
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads")
    results = {}
    for w in which:
        results[w] = {"train": bench_train, "generate": bench_generate, "mixed": bench_mixed}[w]()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
