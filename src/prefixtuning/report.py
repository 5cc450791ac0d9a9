"""Turn a sweep into the paper's tables and figures.

    python -m prefixtuning.report <multirun dir | run dirs...> [--out DIR] [--compare KEY=VALUE]

One row per job, read from its `metrics.json` and its Hydra overrides (`.hydra/overrides.yaml`). The keys
whose values differ between jobs are the swept keys; `seed` and `lowres.sample` are replicates: jobs that
differ only in those are one group, reported as mean ± std (population std over the n jobs) with n.
A job without `metrics.json` (failed, killed or still running) is listed as such in every output, never
dropped. Writes to `--out` (default `<first dir>/report`):

  jobs.csv       every job: folder, status, swept values, every numeric metric
  summary.csv    every group: swept values, n, mean and std of every metric
  summary.md     the table (paper layout when the sweep has one: rows x datasets x metrics for a `row`
                 sweep, seen / unseen / all columns for WebNLG-style subsets), then jobs without results
  *.png          figures where the sweep has them: metric vs training size (one line per method, error
                 bars = std), metric vs prefix length, initialization strategies, APT gate heatmaps
  significance.csv / .md   with --compare KEY=VALUE (e.g. --compare row=replay_prefix): every other value of
                 KEY against that baseline, jobs paired by their replicate values (seed, lowres.sample) and
                 the other swept keys, on the same test inputs: for every resampleable corpus metric the
                 difference, its 95% paired-bootstrap interval and p (inputs of all pairs pooled), the
                 approximate-randomization p, each pair's difference with a sign count, the exact
                 sign-flip p across pairs (data samples / seeds), and the verdict of the input-level tests
                 "differs (p < 0.05)" / "not separable" (significance.py)
  significance_samples.csv   with --compare: the run-level numbers no per-input test covers (NIST, METEOR,
                 CIDEr, WebNLG seen / unseen scores, the dev loss): per-pair differences, sign count, exact
                 sign-flip p across pairs and its verdict (also in significance.md)

Experiment files run this at the end of their multirun (`ReportCallback`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from . import atomic
from . import significance as S
from .resume import HISTORY, OPERATIONAL

REPLICATES = ("seed", "lowres.sample")
# the task metric a figure plots, in order of preference
MAIN_METRICS = ("test/BLEU", "test/all/BLEU", "test/ROUGE-L", "test/ROUGE-2", "test/accuracy", "test/f1a", "test/f1",
                "val/BLEU", "val/accuracy", "val/loss")


@dataclass
class Job:
    folder: Path
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    history: list[dict] = field(default_factory=list)  # history.jsonl: one entry per command that trained here

    @property
    def reruns(self) -> str:
        """'' for a job that ran once; else how it continued, e.g. 'resume' or 'restart, resume'."""
        return ", ".join(h.get("mode", "?") for h in self.history[1:])


def _history(folder: Path) -> list[dict]:
    f = folder / HISTORY
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"mode": "unreadable entry"})
    return out


def _overrides(folder: Path) -> dict[str, str]:
    f = folder / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return {}
    out = {}
    for o in OmegaConf.load(f):
        k, _, v = str(o).partition("=")
        out[k.lstrip("+~")] = v
    return out


def find_jobs(paths: list[Path]) -> list[Job]:
    """Job folders: each given run folder, or every job folder (with .hydra/) under a multirun folder."""
    folders: list[Path] = []
    for p in paths:
        if (p / ".hydra").is_dir() or (p / "metrics.json").is_file():
            folders.append(p)
        else:
            found = sorted((q.parent for q in p.glob("*/.hydra")), key=lambda q: (len(q.name), q.name))
            if not found:
                raise SystemExit(f"error: {p} holds no runs (no .hydra/ or metrics.json in it or its subfolders)")
            folders += found
    jobs = []
    for f in folders:
        job = Job(f, _overrides(f), history=_history(f))
        m = f / "metrics.json"
        if not m.is_file():
            job.status = "no metrics.json (failed, killed or unfinished)"
        else:
            try:
                data = json.loads(m.read_text())
                job.metrics = {k: float(v) for k, v in data.items() if k != "attempts"
                               and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
            except (json.JSONDecodeError, ValueError) as err:
                job.status = f"unreadable metrics.json ({err})"
        jobs.append(job)
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    keys = sorted({k for j in jobs for k in j.overrides})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1 and not k.startswith("hydra.")
            and k not in OPERATIONAL]


def group(jobs: list[Job], keys: list[str]) -> list[dict]:
    """Groups of finished jobs over the non-replicate swept keys: {key: value, 'n', metric: (mean, std)}."""
    by = [k for k in keys if k not in REPLICATES]
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        if j.status == "ok":
            groups.setdefault(tuple(j.overrides.get(k, "") for k in by), []).append(j)
    out = []
    for values, members in groups.items():
        row = dict(zip(by, values))
        row["n"] = len(members)
        for m in sorted({m for j in members for m in j.metrics}):
            xs = [j.metrics[m] for j in members if m in j.metrics]
            mean = sum(xs) / len(xs)
            row[m] = (mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)), len(xs))
        out.append(row)
    return sorted(out, key=lambda r: [_sort_key(r[k]) for k in by])


def _sort_key(v: str):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _fmt(cell) -> str:
    if isinstance(cell, tuple):
        mean, std, n = cell
        return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"
    return str(cell)


def table_metrics(rows: list[dict]) -> list[str]:
    names = sorted({k for r in rows for k, v in r.items() if isinstance(v, tuple)})
    tests = [m for m in names if m.startswith("test/") and not m.endswith(("/inputs", "/split"))]
    return tests or [m for m in names if m.startswith("val/")]


def markdown(rows: list[dict], keys: list[str], jobs: list[Job]) -> str:
    by = [k for k in keys if k not in REPLICATES]
    metrics = table_metrics(rows)
    lines = []
    if "row" in by and len(by) > 1:  # the paper's layout: methods x (other swept values) x metrics
        cols = [k for k in by if k != "row"]
        combos = sorted({tuple(r[c] for c in cols) for r in rows}, key=lambda t: [_sort_key(x) for x in t])
        head = ["row"] + [f"{'/'.join(c)} {m.removeprefix('test/')}" for c in combos for m in metrics]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in sorted({r["row"] for r in rows}):
            cells = [method]
            for c in combos:
                match = [r for r in rows if r["row"] == method and tuple(r[k] for k in cols) == c]
                cells += [_fmt(match[0].get(m, "")) if match else "" for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        head = by + ["n"] + [m.removeprefix("test/") for m in metrics]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([str(r[k]) for k in by] + [str(r["n"])] + [_fmt(r.get(m, "")) for m in metrics]) + " |")
    reps = [k for k in keys if k in REPLICATES]
    note = (f"\nMean ± std (population) over {', '.join(reps)}; n = jobs per cell." if reps else
            "\nOne job per cell.")
    again = [j for j in jobs if j.reruns]
    if again:
        note += ("\n\nJobs that ran more than once (stopped, then continued from their checkpoint or begun again; "
                 "a continued run equals an uninterrupted one, tests/test_faults.py):\n" + "\n".join(
                     f"- {j.folder}: {len(j.history)} attempts (new, {j.reruns})" for j in again))
    missing = [j for j in jobs if j.status != "ok"]
    if missing:
        note += "\n\nJobs without results (not in the table):\n" + "\n".join(
            f"- {j.folder}: {j.status} ({' '.join(f'{k}={v}' for k, v in j.overrides.items())})" for j in missing)
    return "\n".join(lines) + "\n" + note + "\n"


def main_metric(rows: list[dict]) -> str | None:
    names = {k for r in rows for k, v in r.items() if isinstance(v, tuple)}
    return next((m for m in MAIN_METRICS if m in names), None)


def series(rows: list[dict], x_key: str, line_key: str | None, metric: str) -> dict[str, tuple[list, list, list]]:
    """line -> (x values, means, stds), x sorted numerically: the data a figure plots."""
    out: dict[str, tuple[list, list, list]] = {}
    for r in sorted(rows, key=lambda r: _sort_key(r[x_key])):
        if metric not in r:
            continue
        line = str(r.get(line_key, metric)) if line_key else metric
        xs, ms, ss = out.setdefault(line, ([], [], []))
        xs.append(float(r[x_key]) if _sort_key(r[x_key])[0] == 0 else r[x_key])
        ms.append(r[metric][0])
        ss.append(r[metric][1])
    return out


def figures(rows: list[dict], keys: list[str], jobs: list[Job], out: Path, metric: str | None = None
            ) -> dict[str, dict]:
    """Write the figures the sweep has; returns name -> the plotted series (for tests and notebooks)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is untouched

    metric = metric or main_metric(rows)
    made: dict[str, dict] = {}
    by = [k for k in keys if k not in REPLICATES]
    line_key = "row" if "row" in by else ("method" if "method" in by else None)
    plots = [("lowdata", "lowres.size", "training examples", "log"),
             ("prefix_length", "prefix.length", "prefix length", "linear"),
             ("prefix_length", "data.prefix_length", "prefix length", "linear")]
    for name, x_key, label, scale in plots:
        if metric is None or x_key not in by or name in made:
            continue
        data = series(rows, x_key, line_key, metric)
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for line, (xs, ms, ss) in data.items():
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=line)
        ax.set_xscale(scale)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        if line_key:
            ax.legend(title=line_key)
        fig.tight_layout()
        with atomic.atomic_path(out / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        made[name] = data
    if metric is not None and "init" in by:
        data = series(rows, "init", None, metric)
        xs, ms, ss = data[metric]
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        ax.bar(range(len(xs)), ms, yerr=ss, capsize=4)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_ylabel(metric)
        ax.set_xlabel("initialization")
        fig.tight_layout()
        with atomic.atomic_path(out / "init.png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        made["init"] = data
    for j in jobs:  # APT runs write their gate heatmap after the test split; collected here per job
        png = j.folder / "gates_test.png"
        if png.is_file():
            atomic.write_bytes(out / f"gates_{j.folder.name}.png", png.read_bytes())
            made.setdefault("gates", {})[str(j.folder)] = str(out / f"gates_{j.folder.name}.png")
    return made


class CompareError(SystemExit):
    pass


def _predictions(job: Job) -> tuple[str, list[str], list[str], list[list[str]], list[dict]] | str:
    """(task, inputs, predictions, references, per-input meta such as WebNLG's category) of a job's test decode,
    or why there are none."""
    f = job.folder / "predictions_test.jsonl"
    cfg = job.folder / "config.yaml"
    if not f.is_file() or not cfg.is_file():
        return f"no {f.name if not f.is_file() else cfg.name}"
    task = OmegaConf.select(OmegaConf.load(cfg), "data.name")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if rows and "gold" in rows[0]:  # an NLU task: (where in the official file, predicted label, gold label)
        return task, [r["where"] for r in rows], [r["pred"] for r in rows], [r["gold"] for r in rows], []
    return (task, [r["input"] for r in rows], [r["prediction"] for r in rows], [r["references"] for r in rows],
            [r.get("meta", {}) for r in rows])


def compare(jobs: list[Job], keys: list[str], baseline: str, resamples: int = 1000, trials: int = 10000,
            seed: int = 12345) -> list[dict]:
    """Every other value of KEY against KEY=VALUE: paired tests over the test inputs (significance.py)."""
    key, sep, value = baseline.partition("=")
    if not sep or key not in keys:
        raise CompareError(f"error: --compare {baseline}: give KEY=VALUE with KEY one of the swept keys "
                           f"({', '.join(keys) or 'none'})")
    others = [k for k in keys if k not in REPLICATES and k != key]
    reps = [k for k in keys if k in REPLICATES]
    ok = [j for j in jobs if j.status == "ok"]
    base = {(tuple(j.overrides.get(o) for o in others), tuple(j.overrides.get(r) for r in reps)): j
            for j in ok if j.overrides.get(key) == value}
    if not base:
        raise CompareError(f"error: --compare {baseline}: no finished job has {key}={value} (values: "
                           f"{', '.join(sorted({str(j.overrides.get(key)) for j in ok}))})")
    cache: dict = {}

    def decoded(j):
        if j.folder not in cache:
            cache[j.folder] = _predictions(j)
        return cache[j.folder]

    out = []
    cells = sorted({(j.overrides.get(key), tuple(j.overrides.get(o) for o in others)) for j in ok
                    if j.overrides.get(key) != value}, key=lambda c: [_sort_key(str(x)) for x in (c[0], *c[1])])
    for val, other in cells:
        pairs, problems = [], []
        for j in ok:
            if j.overrides.get(key) != val or tuple(j.overrides.get(o) for o in others) != other:
                continue
            rep = tuple(j.overrides.get(r) for r in reps)
            b = base.get((other, rep))
            if b is None:
                same = ", ".join(f"{r}={v}" for r, v in zip(reps, rep)) or "the same settings"
                problems.append(f"{j.folder.name}: no baseline job with {same}")
                continue
            da, db = decoded(b), decoded(j)
            if isinstance(da, str) or isinstance(db, str):
                problems.append(f"{j.folder.name}: {db if isinstance(db, str) else da}")
                continue
            if da[0] != db[0] or da[1] != db[1]:
                problems.append(f"{j.folder.name}: not decoded on the baseline's test inputs")
                continue
            pairs.append((rep, da, db, b, j))
        row = {key: val, **dict(zip(others, other)), "pairs": len(pairs), "problems": problems, "metrics": {},
               "across": {}}
        if pairs:
            task = pairs[0][1][0]
            per = [(rep, S.task_metrics(task, da[2], da[3], da[4]), S.task_metrics(task, db[2], db[3], db[4]))
                   for rep, da, db, _, _ in pairs]
            for name in per[0][1]:
                a_all = S.pooled([ma[name] for _, ma, _ in per])
                b_all = S.pooled([mb[name] for _, _, mb in per])
                boot = S.paired_bootstrap(a_all, b_all, resamples, seed)
                each = [mb[name].corpus() - ma[name].corpus() for _, ma, mb in per]
                p_ar = S.approximate_randomization(a_all, b_all, trials, seed)
                row["metrics"][f"test/{name}"] = {
                    **boot, "p_ar": p_ar,
                    "per_pair": each, "signs": (sum(d > 0 for d in each), sum(d < 0 for d in each),
                                                sum(d == 0 for d in each)),
                    "p_pairs": S.sign_flip(each),
                    "higher_is_better": a_all.higher_is_better,
                    "verdict": S.verdict(boot["p"], p_ar=p_ar, interval=(boot["low"], boot["high"]))}
            row["not_resampled"] = [f"test/{m}" for m in S.NOT_RESAMPLED.get(task, ()) if f"test/{m}" not in
                                    row["metrics"] and any(f"test/{m}" in j.metrics for *_, j in pairs)]
            row["across"] = across_samples([(b, j) for *_, b, j in pairs], set(row["metrics"]))
        out.append(row)
    return out


def _per_run_metric(name: str) -> bool:
    """A run-level number worth comparing across samples: a test or dev score, not a count or a start value."""
    return name.startswith(("test/", "val/")) and not name.endswith(("_start", "/inputs", "/n"))


def across_samples(pairs: list[tuple[Job, Job]], tested: set[str]) -> dict[str, dict]:
    """The metrics each run reports as one number (metrics.json) that no per-input test covers, e.g. NIST,
    METEOR, CIDEr, the WebNLG seen / unseen scores and the dev loss: per pair (baseline A, row B, same replicate
    values) B - A, the sign count and the exact sign-flip p across pairs; "differs" where that p < 0.05."""
    names = sorted({m for a, b in pairs for m in (*a.metrics, *b.metrics) if _per_run_metric(m)} - tested)
    out = {}
    for m in names:
        have = [(a.metrics[m], b.metrics[m]) for a, b in pairs if m in a.metrics and m in b.metrics]
        if len(have) != len(pairs):  # a run without this metric: say so rather than test on fewer pairs
            out[m] = {"pairs": len(have), "missing": len(pairs) - len(have)}
            continue
        diffs = [vb - va for va, vb in have]
        p = S.sign_flip(diffs)
        out[m] = {"pairs": len(have), "a": sum(va for va, _ in have) / len(have),
                  "b": sum(vb for _, vb in have) / len(have), "delta": sum(diffs) / len(diffs), "per_pair": diffs,
                  "signs": (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs)),
                  "p_pairs": p, "verdict": f"differs (p < {S.ALPHA:g})" if p < S.ALPHA else "not separable"}
    return out


def significance_markdown(rows: list[dict], key: str, baseline: str, others: list[str]) -> str:
    lines = [f"Paired tests against {baseline} (B = the row, A = the baseline; same test inputs, jobs paired by "
             f"{', '.join(REPLICATES)}; inputs of all pairs pooled; paired bootstrap 95% interval and p, approximate "
             f"randomization p; signs = pairs where B - A > 0 / < 0 / = 0; p (pairs) = exact sign-flip test of the mean "
             f"per-pair B - A across {', '.join(REPLICATES)}, which sees the spread between data draws; its smallest "
             f"p is 2 / 2^pairs; the verdict is the input-level tests'):", "",
             "| " + " | ".join([key, *others, "metric", "pairs", "B - A", "95% interval", "p (bootstrap)",
                                "p (AR)", "per pair B - A", "signs +/-/=", "p (pairs)", "verdict"]) + " |",
             "|" + "---|" * (len(others) + 11)]
    notes = []
    for r in rows:
        head = [str(r[key]), *(str(r[o]) for o in others)]
        if not r["metrics"]:
            empty = ["-", str(r["pairs"]), "", "", "", "", "", "", "", "no paired jobs"]
            lines.append("| " + " | ".join(head + empty) + " |")
        for m, t in r["metrics"].items():
            lines.append("| " + " | ".join(head + [
                m.removeprefix("test/"), str(r["pairs"]), f"{t['delta']:+.4f}", f"[{t['low']:+.4f}, {t['high']:+.4f}]",
                f"{t['p']:.4f}", f"{t['p_ar']:.4f}", " ".join(f"{d:+.4f}" for d in t["per_pair"]),
                "/".join(str(x) for x in t["signs"]), f"{t['p_pairs']:.4f}", t["verdict"]]) + " |")
        notes += [f"- {r[key]}: {p}" for p in r["problems"]]
    nr = sorted({m for r in rows for m in r.get("not_resampled", [])})
    foot = ""
    if nr:
        foot += (f"\nNot tested per input (their official scorers are not decomposable into per-input statistics "
                 f"here): {', '.join(nr)}; they are tested across samples below.")
    if any(r["across"] for r in rows):
        foot += ("\n\nAcross samples only: the run-level numbers no per-input test covers (metrics.json: the scores "
                 "above, subset scores, the dev loss); A and B = means over the pairs, B - A = mean per-pair "
                 "difference, verdict = the sign-flip test's (differs where p (pairs) < 0.05; loss and TER: lower is "
                 "better):\n\n| " + " | ".join([key, *others, "metric", "pairs", "A", "B", "B - A", "per pair B - A",
                                                 "signs +/-/=", "p (pairs)", "verdict"]) + " |\n"
                 + "|" + "---|" * (len(others) + 10))
        for r in rows:
            head = [str(r[key]), *(str(r[o]) for o in others)]
            for m, t in r["across"].items():
                if "missing" in t:
                    foot += "\n| " + " | ".join(head + [m, str(t["pairs"]), "", "", "", "", "", "", (
                        f"not tested: {t['missing']} of the pairs lack it")]) + " |"
                    continue
                foot += "\n| " + " | ".join(head + [
                    m, str(t["pairs"]), f"{t['a']:.4f}", f"{t['b']:.4f}", f"{t['delta']:+.4f}",
                    " ".join(f"{d:+.4f}" for d in t["per_pair"]), "/".join(str(x) for x in t["signs"]),
                    f"{t['p_pairs']:.4f}", t["verdict"]]) + " |"
    if any(t.get("higher_is_better") is False for r in rows for t in r["metrics"].values()):
        foot += "\nTER: lower is better (a negative B - A is a gain)."
    if notes:
        foot += "\n\nJobs left out of the comparison:\n" + "\n".join(notes)
    return "\n".join(lines) + "\n" + foot + "\n"


def report(paths: list[Path], out: Path | None = None, metric: str | None = None,
           baseline: str | None = None) -> dict:
    jobs = find_jobs(paths)
    keys = swept_keys(jobs)
    rows = group(jobs, keys)
    out = out or paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    metric_names = sorted({m for j in jobs for m in j.metrics})
    with atomic.atomic_path(out / "jobs.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["folder", "status", "attempts", *keys, *metric_names])
        for j in jobs:
            w.writerow([j.folder, j.status, len(j.history) or "", *(j.overrides.get(k, "") for k in keys),
                        *(j.metrics.get(m, "") for m in metric_names)])
    by = [k for k in keys if k not in REPLICATES]
    stats = sorted({k for r in rows for k, v in r.items() if isinstance(v, tuple)})
    with atomic.atomic_path(out / "summary.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*by, "n", *(f"{m} {s}" for m in stats for s in ("mean", "std"))])
        for r in rows:
            w.writerow([*(r[k] for k in by), r["n"], *(x for m in stats for x in (r[m][:2] if m in r else ("", "")))])
    atomic.write_text(out / "summary.md", markdown(rows, keys, jobs))
    made = figures(rows, keys, jobs, out, metric)
    result = {"out": out, "jobs": jobs, "swept": keys, "rows": rows, "figures": made}
    if baseline:
        cmp_rows = compare(jobs, keys, baseline)
        key = baseline.partition("=")[0]
        others = [k for k in keys if k not in REPLICATES and k != key]
        with atomic.atomic_path(out / "significance.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([key, *others, "metric", "pairs", "a", "b", "delta", "low", "high", "p_bootstrap", "p_ar",
                        "resamples", "seed", "inputs", "per_pair", "signs", "p_pairs", "verdict"])
            for r in cmp_rows:
                for m, t in r["metrics"].items():
                    w.writerow([r[key], *(r[o] for o in others), m, r["pairs"], t["a"], t["b"], t["delta"], t["low"],
                                t["high"], t["p"], t["p_ar"], t["resamples"], t["seed"], t["inputs"],
                                " ".join(f"{d:.6f}" for d in t["per_pair"]), "/".join(map(str, t["signs"])),
                                t["p_pairs"], t["verdict"]])
        with atomic.atomic_path(out / "significance_samples.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([key, *others, "metric", "pairs", "a", "b", "delta", "per_pair", "signs", "p_pairs",
                        "verdict"])
            for r in cmp_rows:
                for m, t in r["across"].items():
                    if "missing" in t:
                        w.writerow([r[key], *(r[o] for o in others), m, t["pairs"], "", "", "", "", "", "",
                                    f"not tested: {t['missing']} of the pairs lack it"])
                        continue
                    w.writerow([r[key], *(r[o] for o in others), m, t["pairs"], t["a"], t["b"], t["delta"],
                                " ".join(f"{d:.6f}" for d in t["per_pair"]), "/".join(map(str, t["signs"])),
                                t["p_pairs"], t["verdict"]])
        atomic.write_text(out / "significance.md", significance_markdown(cmp_rows, key, baseline, others))
        result["significance"] = cmp_rows
    return result


class ReportCallback(Callback):
    """Hydra callback: `hydra.callbacks.report._target_=prefixtuning.report.ReportCallback` runs the report
    on the sweep folder when a multirun ends and prints where the tables and figures are; `compare: KEY=VALUE`
    adds the paired significance tests against that baseline (significance.csv / .md)."""

    def __init__(self, compare: str | None = None):
        self.compare = compare

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            r = report([sweep], baseline=self.compare)
        except SystemExit as err:
            print(f"[report] {err}", flush=True)
            return
        failed = sum(j.status != "ok" for j in r["jobs"])
        print(f"[report] {len(r['jobs'])} jobs ({failed} without results) -> {r['out'] / 'summary.md'}, "
              f"{r['out'] / 'summary.csv'}" + "".join(f", {r['out'] / n}.png" for n in r["figures"] if n != "gates"),
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prefixtuning.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a multirun folder, or run folders")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--metric", default=None, help=f"the metric the figures plot (default: the first of "
                                                   f"{', '.join(MAIN_METRICS)} the jobs have)")
    ap.add_argument("--compare", default=None, metavar="KEY=VALUE",
                    help="paired significance of every other value of KEY against this baseline, e.g. "
                         "row=replay_prefix (significance.csv / .md)")
    args = ap.parse_args(argv)
    r = report(args.paths, args.out, args.metric, args.compare)
    missing = [j for j in r["jobs"] if j.status != "ok"]
    print(f"[report] {len(r['jobs'])} jobs, swept {', '.join(r['swept']) or 'nothing'}; {len(r['rows'])} groups -> "
          f"{r['out']}", flush=True)
    for j in missing:
        print(f"[report] without results: {j.folder}: {j.status}", flush=True)
    print((r["out"] / "summary.md").read_text())
    if args.compare:
        print((r["out"] / "significance.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
