"""Side-by-side measurements at the paper's shapes (ratios from one run, interleaved; not tests).

    python benchmarks/prefix_benchmarks.py                 # every part below
    python benchmarks/prefix_benchmarks.py train generate  # some parts
    python benchmarks/prefix_benchmarks.py --repeats 7     # more samples per cell
    python benchmarks/prefix_benchmarks.py --markdown out.md  # also write the table

Parts:
  train     train step (forward + backward + AdamW step) of ours vs HF PEFT prefix tuning vs full fine-tuning,
            and peak resident memory (a fresh process per variant, 3 steps)
  generate  tokens/s with a prefix vs the plain backbone, greedy at batch 8 and beam 5
  mixed     32 requests with 32 different prefixes: one mixed batch vs 32 sequential calls (PrefixBank), and
            the same without prefixes (how much batching alone gains on this machine)
  bf16      bf16-mixed (autocast) vs float32 train step on the GPT-2-small shape (ours, P=10)
  profile   torch.profiler's top operators of ours' train step at each shape (not in the default parts)

Shapes (random weights; only the arithmetic matters):
  gpt2-P10    GPT-2 small (12 x 768, 12 heads, 50,257 vocabulary), batch 8 x 64 tokens (32 source with the
              loss masked + 32 target, as table-to-text data), P=10
  gpt2-P200   GPT-2 small, batch 4 x 512 tokens (448 source + 64 target: XSUM-like), P=200
  smollm2-P10 SmolLM2-135M (30 x 576, 9 query heads sharing 3 key/value heads (GQA), rotary positions,
              49,152 vocabulary), batch 8 x 64 tokens, P=10
  bart-P200   BART-base (6 + 6 layers x 768), batch 4 x 512 source tokens, 64 target tokens, P=200. Ours prefixes
              encoder, decoder and cross attention (the paper's setting); PEFT prefixes the decoder only
              (its self- and cross-attention caches), so it does less work than ours here.

Every cell is measured in one process with its variants interleaved (A B C A B C ...) after one warm-up
each; the median and the range (min-max) are printed. A ratio is ours / reference of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import cpu_flags, cpu_model  # noqa: E402

TARGETS = {"train_vs_peft": 0.90, "train_vs_full": 0.60, "mem_vs_peft": 1.00, "gen_P10": 0.95, "gen_P200": 0.85,
           "mixed": 8.0}


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str          # gpt2 | llama | bart
    batch: int
    source: int        # tokens with the loss masked (decoder-only) / encoder tokens (BART)
    target: int
    prefix: int
    gen_batch: int = 8
    beam_batch: int = 8

    @property
    def desc(self) -> str:
        if self.arch == "bart":
            return f"{self.batch} x {self.source} source + {self.target} target, P={self.prefix}"
        return f"{self.batch} x {self.source + self.target} ({self.source} source + {self.target} target), P={self.prefix}"


SHAPES = {
    "gpt2-P10": Shape("gpt2-P10", "gpt2", 8, 32, 32, 10),
    "gpt2-P200": Shape("gpt2-P200", "gpt2", 4, 448, 64, 200, gen_batch=8, beam_batch=2),
    "smollm2-P10": Shape("smollm2-P10", "llama", 8, 32, 32, 10),
    "bart-P200": Shape("bart-P200", "bart", 4, 512, 64, 200, gen_batch=8, beam_batch=2),
}


def random_model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":  # SmolLM2-135M's config
        cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                             rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "bart":  # BART-base's config
        cfg = tf.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            max_position_embeddings=1024, forced_bos_token_id=None)
        model = tf.BartForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    return model


def backbone(arch: str, model=None):
    from transformers import AutoTokenizer

    from prefixtuning.backbone import Backbone
    from prefixtuning.local_backbones import build_local

    tok = AutoTokenizer.from_pretrained(build_local("tiny-bart" if arch == "bart" else "tiny-gpt2"))
    return Backbone(model if model is not None else random_model(arch).eval(), tok, f"{arch}-random")


def train_batch(s: Shape):
    g = torch.Generator().manual_seed(0)
    if s.arch == "bart":
        src = torch.randint(4, 1000, (s.batch, s.source), generator=g)
        tgt = torch.randint(4, 1000, (s.batch, s.target), generator=g)
        return src, torch.ones_like(src), tgt
    ids = torch.randint(0, 1000, (s.batch, s.source + s.target), generator=g)
    labels = ids.clone()
    labels[:, :s.source] = -100
    return ids, torch.ones_like(ids), labels


def train_variant(s: Shape, variant: str):
    """(step function, trainable parameter count) for one variant on its own model copy."""
    model = random_model(s.arch)
    ids, mask, labels = train_batch(s)
    if variant.startswith("ours"):
        from prefixtuning.model import PrefixTuningModel
        from prefixtuning.prefixes import build_prefix

        bb = backbone(s.arch, model)
        # ours-peft-sites: only the attention sites PEFT prefixes (BART: decoder self- and cross-attention)
        sites = ["decoder", "cross"] if variant == "ours-peft-sites" else None
        prefix = build_prefix({"kind": "static", "length": s.prefix, "sites": sites}, bb.geometry)
        net = PrefixTuningModel(bb, prefix, target_logits_only=variant != "ours-all-logits").train()
        params = list(prefix.parameters())

        def forward():
            if variant == "ours-bf16-mixed":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(ids, mask, labels=labels).loss
            return net(ids, mask, labels=labels).loss
    elif variant == "peft":
        from peft import PrefixTuningConfig, get_peft_model

        task = "SEQ_2_SEQ_LM" if s.arch == "bart" else "CAUSAL_LM"
        net = get_peft_model(model, PrefixTuningConfig(task_type=task, num_virtual_tokens=s.prefix)).train()
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

    return step, sum(p.numel() for p in params)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: [seconds]}: every function once per round (A B C A B C ...), after `warmup` rounds."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def med(ts):
    return statistics.median(ts)


def spread(ts, scale=1.0, fmt="{:.0f}"):
    return f"{fmt.format(med(ts) * scale)} ({fmt.format(min(ts) * scale)}-{fmt.format(max(ts) * scale)})"


def high_water_mb() -> float:
    """This process's peak resident set. VmHWM starts afresh at exec; getrusage's ru_maxrss would carry
    the parent's peak over (Linux keeps it across fork + exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(shape: str, variant: str) -> float:
    """Peak resident set (MB) of a fresh process that builds the variant and runs 3 steps."""
    out = subprocess.run([sys.executable, __file__, "_peak", shape, variant], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory process for {shape}/{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def bench_train(shapes, repeats, rows):
    for name in shapes:
        s = SHAPES[name]
        bart = s.arch == "bart"
        # BART: PEFT prefixes the decoder only, so the comparison with PEFT uses ours on the same sites
        vs_peft = "ours-peft-sites" if bart else "ours"
        variants = ["ours", "peft", "full"] + (["ours-peft-sites"] if bart else ["ours-all-logits"])
        steps, trainable = {}, {}
        for v in variants:
            steps[v], trainable[v] = train_variant(s, v)
        times = interleaved(steps, repeats)
        del steps
        mem = {v: peak_rss(name, v) for v in (vs_peft, "peft", "full")}
        o, op = med(times["ours"]), med(times[vs_peft])
        print(f"train {name}: " + ", ".join(f"{v} {spread(t, 1000)} ms" for v, t in times.items())
              + f"; peak RSS {vs_peft} {mem[vs_peft]:.0f} / PEFT {mem['peft']:.0f} / full {mem['full']:.0f} MB", flush=True)
        what = f"train step, {s.desc}"
        rows.append(dict(part="train", shape=name,
                         what=what + (", ours and PEFT on decoder self- + cross-attention only" if bart else ""),
                         ours=spread(times[vs_peft], 1000) + " ms", ref="HF PEFT " + spread(times["peft"], 1000) + " ms",
                         ratio=op / med(times["peft"]), target=f"<= {TARGETS['train_vs_peft']}",
                         ok=op / med(times["peft"]) <= TARGETS["train_vs_peft"]))
        rows.append(dict(part="train", shape=name,
                         what="same" + (", ours on encoder + decoder + cross (the paper's setting)" if bart else ""),
                         ours=spread(times["ours"], 1000) + " ms" if bart else "",
                         ref="full fine-tuning " + spread(times["full"], 1000) + " ms", ratio=o / med(times["full"]),
                         target=f"<= {TARGETS['train_vs_full']}", ok=o / med(times["full"]) <= TARGETS["train_vs_full"]))
        if "ours-all-logits" in times:
            rows.append(dict(part="train", shape=name, what="same, ours with logits at every position (injection alone)",
                             ours=spread(times["ours-all-logits"], 1000) + " ms", ref="HF PEFT",
                             ratio=med(times["ours-all-logits"]) / med(times["peft"]), target="(reported)", ok=None))
        rows.append(dict(part="train", shape=name, what="peak resident memory, the step compared with PEFT",
                         ours=f"{mem[vs_peft]:.0f} MB", ref=f"PEFT {mem['peft']:.0f} MB / full FT {mem['full']:.0f} MB",
                         ratio=mem[vs_peft] / mem["peft"], target=f"<= {TARGETS['mem_vs_peft']} (vs PEFT)",
                         ok=mem[vs_peft] <= mem["peft"]))


def prompts(s: Shape, n: int, bb):
    """n prompts: E2E test inputs for short shapes; random ids of `source` tokens for the long ones."""
    from prefixtuning.decoding import pad_prompts

    if s.source <= 64:
        from prefixtuning.data.e2e import E2EData
        from prefixtuning.data.features import Featurizer

        groups = E2EData().eval_groups("test")
        f = Featurizer(bb.tokenizer, bb.is_encoder_decoder)
        seqs = [f.prompt_ids(groups[i % len(groups)].source) for i in range(n)]
        return pad_prompts(seqs, bb.tokenizer.pad_token_id, bb.is_encoder_decoder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (n, s.source), generator=g)
    return ids, torch.ones_like(ids)


def bench_generate(shapes, repeats, rows, new_tokens=32):
    from prefixtuning.model import PrefixTuningModel
    from prefixtuning.prefixes import build_prefix

    for name in shapes:
        s = SHAPES[name]
        bb = backbone(s.arch)
        torch.manual_seed(0)
        m = PrefixTuningModel(bb, build_prefix({"kind": "static", "length": s.prefix}, bb.geometry)).eval()
        for mode, batch, beams in (("greedy", s.gen_batch, 1), ("beam 5", s.beam_batch, 5)):
            ids, mask = prompts(s, batch, bb)
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False,
                      pad_token_id=bb.tokenizer.pad_token_id)
            if beams > 1:
                kw["early_stopping"] = False

            def with_prefix():
                m.generate(ids, mask, **kw)

            def plain():
                bb.injector.deactivate()
                with torch.no_grad():
                    bb.model.generate(input_ids=ids, attention_mask=mask, **kw)

            times = interleaved({"plain": plain, "prefix": with_prefix}, repeats)
            tokens = batch * new_tokens
            tp, tq = tokens / med(times["plain"]), tokens / med(times["prefix"])
            ratio = med(times["plain"]) / med(times["prefix"])
            target = TARGETS["gen_P10"] if s.prefix <= 10 else TARGETS["gen_P200"]
            print(f"generate {name} {mode} batch {batch}: plain {tp:.1f} tok/s, prefix {tq:.1f} tok/s, "
                  f"ratio {ratio:.3f}", flush=True)
            rows.append(dict(part="generate", shape=name,
                             what=f"{mode}, batch {batch} x {new_tokens} new tokens, prompt {ids.shape[1]} tokens, P={s.prefix}",
                             ours=f"{tq:.1f} tok/s ({spread(times['prefix'], 1, '{:.2f}')} s)",
                             ref=f"no prefix {tp:.1f} tok/s ({spread(times['plain'], 1, '{:.2f}')} s)",
                             ratio=ratio, target=f">= {target}", ok=ratio >= target))


def bench_mixed(rows, repeats, n=32, new_tokens=32):
    from prefixtuning.prefixes import build_prefix
    from prefixtuning.serving import PrefixBank

    s = SHAPES["gpt2-P10"]
    bb = backbone(s.arch)
    bank = PrefixBank(bb)
    torch.manual_seed(0)
    for i in range(n):
        bank.add(f"user{i}", build_prefix({"kind": "static", "length": 10}, bb.geometry))
    from prefixtuning.data.e2e import E2EData

    groups = E2EData().eval_groups("test")
    texts, ids = [groups[i % len(groups)].source for i in range(n)], [f"user{i}" for i in range(n)]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False)

    def batched():
        bank.generate(texts, ids, **kw)

    def sequential():
        for t, p in zip(texts, ids):
            bank.generate([t], [p], **kw)

    def plain_batched():
        bank.generate(texts, [None] * n, **kw)

    def plain_sequential():
        for t in texts:
            bank.generate([t], [None], **kw)

    times = interleaved({"mixed": batched, "sequential": sequential, "plain": plain_batched,
                         "plain_sequential": plain_sequential}, max(2, repeats // 2))
    ratio = med(times["sequential"]) / med(times["mixed"])
    ceiling = med(times["plain_sequential"]) / med(times["plain"])
    print(f"mixed serving: one batch {spread(times['mixed'], 1, '{:.2f}')} s, sequential "
          f"{spread(times['sequential'], 1, '{:.2f}')} s, x{ratio:.2f}; no prefix: batch "
          f"{spread(times['plain'], 1, '{:.2f}')} s, sequential {spread(times['plain_sequential'], 1, '{:.2f}')} s, "
          f"x{ceiling:.2f}", flush=True)
    rows.append(dict(part="mixed", shape="gpt2-P10",
                     what=f"{n} requests with {n} different prefixes (P=10), greedy, {new_tokens} new tokens",
                     ours=f"one mixed batch {spread(times['mixed'], 1, '{:.2f}')} s",
                     ref=f"{n} sequential calls {spread(times['sequential'], 1, '{:.2f}')} s",
                     ratio=ratio, target=f">= {TARGETS['mixed']}", ok=ratio >= TARGETS["mixed"]))
    rows.append(dict(part="mixed", shape="gpt2-P10",
                     what=f"the ceiling on this machine: the same {n} requests without any prefix",
                     ours=f"one batch {spread(times['plain'], 1, '{:.2f}')} s",
                     ref=f"{n} sequential calls {spread(times['plain_sequential'], 1, '{:.2f}')} s",
                     ratio=ceiling, target="(reported)", ok=None))
    rows.append(dict(part="mixed", shape="gpt2-P10", what="mixed-prefix batch vs the same batch without prefixes",
                     ours=f"{spread(times['mixed'], 1, '{:.2f}')} s", ref=f"{spread(times['plain'], 1, '{:.2f}')} s",
                     ratio=med(times["plain"]) / med(times["mixed"]), target="(reported)", ok=None))


def bench_bf16(rows, repeats):
    s = SHAPES["gpt2-P10"]
    steps = {v: train_variant(s, v)[0] for v in ("ours", "ours-bf16-mixed")}
    times = interleaved(steps, repeats)
    ratio = med(times["ours-bf16-mixed"]) / med(times["ours"])
    print(f"bf16-mixed vs fp32 train step: {spread(times['ours-bf16-mixed'], 1000)} vs {spread(times['ours'], 1000)} ms, "
          f"ratio {ratio:.3f}", flush=True)
    have = cpu_flags("avx512_bf16", "amx_bf16") or ["no bf16 instructions"]
    rows.append(dict(part="bf16", shape="gpt2-P10", what=f"train step, bf16-mixed autocast vs float32 (CPU: {', '.join(have)})",
                     ours=spread(times["ours-bf16-mixed"], 1000) + " ms", ref="float32 " + spread(times["ours"], 1000) + " ms",
                     ratio=ratio, target="(reported)", ok=None))


def bench_profile(shapes, rows_limit=12):
    """What dominates ours' train step at each shape (torch.profiler, self CPU time, one step after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for name in shapes:
        step, _ = train_variant(SHAPES[name], "ours")
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"profile of ours' train step, {name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows_limit), flush=True)


def table(rows) -> str:
    lines = ["| shape | measurement | ours | reference | ratio | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        met = "" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        lines.append(f"| {r['shape']} | {r['what']} | {r['ours']} | {r['ref']} | {r['ratio']:.3f} | {r['target']} | {met} |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 3 and sys.argv[1] == "_peak":
        step, _ = train_variant(SHAPES[sys.argv[2]], sys.argv[3])
        for _ in range(3):
            step()
        print(json.dumps({"peak_rss_mb": high_water_mb()}))
        return
    ap = argparse.ArgumentParser(description="prefix-tuning benchmarks at the paper's shapes")
    ap.add_argument("parts", nargs="*", default=["train", "generate", "mixed", "bf16"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    header = (f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads; {args.repeats} interleaved repeats per cell")
    print(header, flush=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for part in args.parts:
        if part == "train":
            bench_train(args.shapes, args.repeats, rows)
        elif part == "generate":
            bench_generate(args.shapes, args.repeats, rows)
        elif part == "mixed":
            bench_mixed(rows, args.repeats)
        elif part == "bf16":
            bench_bf16(rows, args.repeats)
        elif part == "profile":
            bench_profile(args.shapes)
        else:
            raise SystemExit(f"unknown part {part!r}: choose from train, generate, mixed, bf16, profile")
    md = f"{header}; {time.perf_counter() - t0:.0f} s in all\n\n{table(rows)}\n"
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
