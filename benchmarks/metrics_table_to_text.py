"""Time all WebNLG and DART metrics on the full official test sets, and prove the fast TER equal to
sacrebleu's (the implementation it replaced) on every segment.

    python benchmarks/metrics_table_to_text.py [--data-dir ../shared/data] [--skip-reference]

WebNLG: the 1,862 outputs of a BART-large model (`metric_parity/webnlg_test_bart_large_system.txt`)
against the 3 official reference files, with the seen / unseen subsets.
DART: no public system output ships with the data, so the stand-in is each input's first reference with
its words in reverse order past the fourth (as in metrics_e2e.py), against the 3 official reference
files (5,097 inputs).

For each task it prints the seconds of the full metric call (BLEU, METEOR, TER, as `score_task` runs
them), of TER alone, and of the previous TER (sacrebleu's `TER.sentence_score` per segment, in a
process pool over all cores); then checks that the per-segment (edits, reference length) pairs and
the corpus TER are identical. `--skip-reference` skips the slow sacrebleu pass.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from machine import cpu_model
from prefixtuning.metrics import score_task
from prefixtuning.metrics.files import read_lines
from prefixtuning.metrics.tasks import groups_from_files, webnlg_normalize
from prefixtuning.metrics.ter import corpus_ter, ter_segment_stats


def _sacrebleu_chunk(pairs):
    from sacrebleu.metrics import TER

    ter = TER()
    out = []
    for hyp, refs in pairs:
        s = ter.sentence_score(hyp, list(refs))
        out.append((s.num_edits, s.ref_length))
    return out


def sacrebleu_stats(hyps, groups):
    """The previous implementation: sacrebleu per segment, chunks in a process pool."""
    pairs = list(zip(hyps, groups))
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = (len(pairs) + workers * 4 - 1) // (workers * 4)
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    with ProcessPoolExecutor(workers) as pool:
        return [s for part in pool.map(_sacrebleu_chunk, chunks) for s in part]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_task(name, hyps_for_ter, ref_files, call, skip_reference: bool, limit: float) -> dict:
    groups = groups_from_files(ref_files)
    ter_segment_stats(["warm up"], [["the compiled kernel"]])  # numba loads its cache once per process
    res, t_all = _timed(call)
    ours, t_ter = _timed(lambda: ter_segment_stats(hyps_for_ter, groups))
    row = {"task": name, "inputs": len(groups), "references": sum(map(len, groups)), "all_metrics_s": t_all,
           "ter_s": t_ter, "target_s": limit, "scores": res["scores"], "skipped": res["skipped"]}
    if not skip_reference:
        theirs, t_ref = _timed(lambda: sacrebleu_stats(hyps_for_ter, groups))
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        row.update(sacrebleu_ter_s=t_ref, segments_differing=len(differ),
                   corpus_ter_ours=corpus_ter(ours), corpus_ter_sacrebleu=corpus_ter(theirs))
        if differ:
            i = differ[0]
            row["first_difference"] = {"segment": i + 1, "ours": ours[i], "sacrebleu": theirs[i]}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared/data"))
    ap.add_argument("--skip-reference", action="store_true", help="do not run sacrebleu's TER for equality")
    args = ap.parse_args()
    data = Path(args.data_dir)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus")
    rows = []

    hyps = read_lines(data / "metric_parity" / "webnlg_test_bart_large_system.txt")
    files = [read_lines(data / "webnlg" / "eval_references" / f"gold-all-cat-reference{k}.lex") for k in range(3)]
    subsets = {"seen": range(971), "unseen": range(971, len(hyps))}
    rows.append(run_task("WebNLG", [webnlg_normalize(h) for h in hyps], files,
                         lambda: score_task("webnlg", hyps, files, subsets=subsets), args.skip_reference, 30))

    files = [read_lines(data / "dart" / "v1.1.1" / "eval_references" / f"all-delex-reference{k}.lex")
             for k in range(3)]
    groups = groups_from_files(files)
    hyps = [" ".join(g[0].split()[:4] + g[0].split()[4:][::-1]) for g in groups]
    rows.append(run_task("DART", hyps, files, lambda: score_task("dart", hyps, files), args.skip_reference, 60))

    print("| task | inputs / references | all metrics s (target) | TER s | previous TER (sacrebleu, "
          f"{os.cpu_count()} processes) s | segments differing | corpus TER ours / sacrebleu |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = (f"{r['sacrebleu_ter_s']:.1f} | {r['segments_differing']} | "
               f"{r['corpus_ter_ours']!r} / {r['corpus_ter_sacrebleu']!r}") if "sacrebleu_ter_s" in r else "- | - | -"
        print(f"| {r['task']} | {r['inputs']:,} / {r['references']:,} | {r['all_metrics_s']:.1f} "
              f"(<= {r['target_s']}) | {r['ter_s']:.1f} | {ref} |")
    print(json.dumps(rows))
    bad = [r["task"] for r in rows if r.get("segments_differing")]
    if bad:
        raise SystemExit(f"TER differs from sacrebleu on {', '.join(bad)}")


if __name__ == "__main__":
    main()
