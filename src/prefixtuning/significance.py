"""Paired significance tests between two systems decoded on the same test inputs.

A corpus metric is resampled through its per-input sufficient statistics, so each resample is scored exactly
as the official scorer scores a corpus (not an average of sentence scores):

  E2E      BLEU (MT-Eval v13a: clipped n-gram matches, n-gram counts, output length, closest reference length)
  WebNLG   BLEU (multi-bleu.perl -lc after the challenge's normalization, first 3 references), TER; for all
           inputs and, where the predictions file carries the categories, the seen / unseen ones
  DART     BLEU (multi-bleu.perl, case-sensitive, 3 references), TER
  XSUM     ROUGE-1 / ROUGE-2 / ROUGE-L (means over documents)

E2E's NIST, METEOR, ROUGE_L and CIDEr are not resampled here (their official scorers weight n-grams by
corpus statistics or run in Java); the report lists them as not tested rather than approximating them.

Tests, for system B against baseline A on the same n inputs:
- paired bootstrap resampling (Koehn 2004): `n_resamples` draws of n inputs with replacement (numpy
  `default_rng(seed)`, the same draws for both systems); the difference B - A of each resample gives the 95%
  percentile interval; the p-value is sacreBLEU's: the share of resampled |differences|, centred on their
  mean, above the observed |difference| ((count + 1) / (resamples + 1));
- approximate randomization (Noreen 1989; Riezler & Maxwell 2005): in each trial every input's two outputs
  are swapped between the systems with probability 1/2; p = share of trials whose |difference| exceeds the
  observed one, (count + 1) / (trials + 1).
Both equal sacreBLEU's implementations given the same statistics and seed (tests/test_significance.py), with
one exception: an observed difference of exactly 0 (e.g. the same outputs) gets p = 1, where those formulas
give their minimum, 1 / (resamples + 1), which would call two identical systems different.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .data.triples import WEBNLG_SEEN, WEBNLG_UNSEEN
from .metrics.ngram import _closest, mteval_tokens, ngrams
from .metrics.tasks import groups_from_files, webnlg_normalize
from .metrics.ter import corpus_ter, ter_segment_stats
from .nlu.metrics import chunks
from .nlu.tasks import NLU_TASKS

SEED = 12345  # sacreBLEU's default
BOOTSTRAP_RESAMPLES = 1000
AR_TRIALS = 10000
ALPHA = 0.05


@dataclass
class Decomposed:
    """A corpus metric as per-input sufficient statistics (n, k) and the function that scores their sum."""
    name: str
    stats: np.ndarray
    score: Callable[[np.ndarray], float]
    higher_is_better: bool = True

    def corpus(self, rows=None) -> float:
        s = self.stats if rows is None else self.stats[rows]
        return float(self.score(s.sum(0)))


# ---------------------------------------------------------------- BLEU statistics
def _bleu_from(s: np.ndarray, scale: float) -> float:
    match, total, hyp_len, ref_len = s[0:4], s[4:8], s[8], s[9]
    if hyp_len == 0 or (match == 0).any():
        return 0.0
    log_p = sum(math.log(match[i] / total[i]) for i in range(4)) / 4
    return scale * math.exp(log_p + min(0.0, 1.0 - ref_len / hyp_len))


def _bleu_rows(hyp_tokens: Sequence[list[str]], ref_tokens: Sequence[Sequence[list[str]]],
               count_total: str) -> np.ndarray:
    rows = np.zeros((len(hyp_tokens), 10))
    for i, (h, refs) in enumerate(zip(hyp_tokens, ref_tokens)):
        ref_max: Counter = Counter()
        for r in refs:
            for g, c in ngrams(r, 4).items():
                ref_max[g] = max(ref_max[g], c)
        for g, c in ngrams(h, 4).items():
            rows[i, len(g) - 1] += min(c, ref_max.get(g, 0))
            if count_total == "ngrams":
                rows[i, 4 + len(g) - 1] += c
        if count_total == "positions":
            for n in range(1, 5):
                rows[i, 4 + n - 1] = max(len(h) - n + 1, 0)
        rows[i, 8] = len(h)
        rows[i, 9] = _closest(len(h), [len(r) for r in refs]) if refs else 0
    return rows


def e2e_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> Decomposed:
    """MT-Eval v13a BLEU (0-1), as metrics.ngram.mteval_bleu_nist."""
    rows = _bleu_rows([mteval_tokens(h) for h in hyps], [[mteval_tokens(r) for r in g] for g in refs], "positions")
    return Decomposed("BLEU", rows, lambda s: _bleu_from(s, 1.0))


def multi_bleu(hyps: Sequence[str], ref_files: Sequence[Sequence[str]], lowercase: bool, name: str = "BLEU"
               ) -> Decomposed:
    """multi-bleu.perl BLEU (0-100), as metrics.ngram.multi_bleu: ref_files[k][i] is the k-th reference."""
    low = (lambda s: s.lower()) if lowercase else (lambda s: s)
    rows = _bleu_rows([low(h).split() for h in hyps],
                      [[low(f[i]).split() for f in ref_files] for i in range(len(hyps))], "ngrams")
    return Decomposed(name, rows, lambda s: _bleu_from(s, 100.0))


def ter(hyps: Sequence[str], groups: Sequence[Sequence[str]], name: str = "TER") -> Decomposed:
    rows = np.array([[e, r] for e, r in ter_segment_stats(hyps, groups)], dtype=float).reshape(-1, 2)
    return Decomposed(name, rows, lambda s: corpus_ter([(s[0], s[1])]), higher_is_better=False)


def means(name: str, per_input: Sequence[float]) -> Decomposed:
    """A metric that is the mean of per-input scores (XSUM's ROUGE)."""
    rows = np.array([[float(x), 1.0] for x in per_input]).reshape(-1, 2)
    return Decomposed(name, rows, lambda s: s[0] / s[1] if s[1] else 0.0)


def _f1_counts(s: np.ndarray) -> float:
    """F1 from summed (tp, fp, fn): 2PR / (P + R) = 2 tp / (2 tp + fp + fn), 0 without a true positive."""
    tp, fp, fn = s[0], s[1], s[2]
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def nlu_metrics(task: str, preds: Sequence, golds: Sequence) -> dict[str, Decomposed]:
    """The NLU tasks' metrics per input (labels, or tag lists for NER), named as metrics.json names them: accuracy
    (a mean), CB's macro-F1 (per-class tp/fp/fn), MultiRC's F1a (tp/fp/fn of "true" per answer option), NER's
    entity F1 (tp/fp/fn of exact chunks per sentence). MultiRC's EM is per question, not per input: not resampled."""
    if task in ("conll03", "conll04"):
        rows = np.zeros((len(preds), 3))
        for i, (p, g) in enumerate(zip(preds, golds)):
            pc, gc = chunks(p), chunks(g)
            rows[i] = (len(pc & gc), len(pc - gc), len(gc - pc))
        return {"f1": Decomposed("f1", rows, _f1_counts)}
    out = {"accuracy": means("accuracy", [float(p == g) for p, g in zip(preds, golds)])}
    if task == "cb":
        labels = sorted(set(golds) | set(preds) | {"entailment", "contradiction", "neutral"})
        rows = np.array([[c == p and c == g, c == p and c != g, c != p and c == g] for p, g in zip(preds, golds)
                         for c in labels], dtype=float).reshape(len(preds), 3 * len(labels))
        out["f1_macro"] = Decomposed("f1_macro", rows, lambda s: float(np.mean(
            [_f1_counts(s[3 * k:3 * k + 3]) for k in range(len(labels))])))
    if task == "multirc":
        rows = np.array([[p == "true" and g == "true", p == "true" and g != "true", p != "true" and g == "true"]
                         for p, g in zip(preds, golds)], dtype=float).reshape(-1, 3)
        out["f1a"] = Decomposed("f1a", rows, _f1_counts)
    return out


def subset(d: Decomposed, name: str, rows: Sequence[int]) -> Decomposed:
    """The metric over some of the inputs: the same per-input statistics, only those rows (e.g. WebNLG's unseen
    categories; equal to the official scorer run on that subset, tests/test_significance.py)."""
    return Decomposed(name, d.stats[list(rows)], d.score, d.higher_is_better)


def task_metrics(task: str, hyps: Sequence[str], refs: Sequence[Sequence[str]],
                 meta: Sequence[dict] = ()) -> dict[str, Decomposed]:
    """The resampleable metrics of a task, named as the run's metrics.json names them (without `test/`). For the
    NLU tasks `hyps` are the predicted labels and `refs` the gold ones (nlu_metrics). `meta`: per input, as the
    predictions file stores it; WebNLG's categories add the seen / unseen subset scores."""
    if task in NLU_TASKS:
        return nlu_metrics(task, hyps, refs)
    if task == "e2e":
        return {"BLEU": e2e_bleu(hyps, refs)}
    if task in ("webnlg", "dart"):
        files = [[g[k] if k < len(g) else "" for g in refs] for k in range(3)]
        groups = groups_from_files(files)
        if task == "webnlg":
            norm = [webnlg_normalize(h) for h in hyps]
            out = {"all/BLEU": multi_bleu(norm, files, True, "all/BLEU"), "all/TER": ter(norm, groups, "all/TER")}
            cats = [m.get("category") for m in meta]
            if cats and len(cats) == len(hyps) and all(cats):  # older predictions files have no categories
                for sub, names in (("seen", WEBNLG_SEEN), ("unseen", WEBNLG_UNSEEN)):
                    rows = [i for i, c in enumerate(cats) if c in names]
                    if rows:
                        out.update({f"{sub}/{m}": subset(out[f"all/{m}"], f"{sub}/{m}", rows) for m in ("BLEU", "TER")})
            return out
        return {"BLEU": multi_bleu(list(hyps), files, False), "TER": ter(list(hyps), groups)}
    if task == "xsum":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        per = [scorer.score(g[0], h) for h, g in zip(hyps, refs)]
        return {name: means(name, [p[key].fmeasure for p in per])
                for name, key in (("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"))}
    raise ValueError(f"no paired test for task {task!r}")


NOT_RESAMPLED = {"e2e": ("NIST", "METEOR", "ROUGE_L", "CIDEr"),
                 "webnlg": ("all/METEOR", "seen/METEOR", "unseen/METEOR", "seen/BLEU", "unseen/BLEU", "seen/TER",
                            "unseen/TER"), "dart": ("METEOR",),
                 "multirc": ("em",), "conll03": ("precision", "recall"), "conll04": ("precision", "recall")}


# ---------------------------------------------------------------- the tests
def paired_bootstrap(a: Decomposed, b: Decomposed, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = SEED
                     ) -> dict:
    """B - A: the observed difference, its 95% bootstrap interval and the p-value (sacreBLEU's paired_bs)."""
    n = _paired(a, b)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=(n_resamples, n), replace=True)
    sa = np.array([a.score(a.stats[i].sum(0)) for i in idx])
    sb = np.array([b.score(b.stats[i].sum(0)) for i in idx])
    delta = b.corpus() - a.corpus()
    diffs = sb - sa
    centred = np.abs(diffs) - np.abs(diffs).mean()
    p = (int(np.sum(centred > abs(delta))) + 1) / (n_resamples + 1)
    if delta == 0:  # no observed difference (e.g. the same outputs): sacreBLEU's formula would give its minimum
        p = 1.0
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": a.corpus(), "b": b.corpus(), "delta": delta, "low": float(low), "high": float(high), "p": p,
            "resamples": n_resamples, "seed": seed, "inputs": n}


def approximate_randomization(a: Decomposed, b: Decomposed, trials: int = AR_TRIALS, seed: int = SEED) -> float:
    """Two-sided p-value of |B - A| under random swaps of the two systems' outputs per input (sacreBLEU's
    paired_ar)."""
    _paired(a, b)
    rng = np.random.default_rng(seed)
    pos = rng.integers(2, size=(trials, len(a.stats)), dtype=bool)
    neg = ~pos
    shuf_a = pos.astype(float) @ a.stats + neg.astype(float) @ b.stats
    shuf_b = neg.astype(float) @ a.stats + pos.astype(float) @ b.stats
    diffs = np.abs(np.array([a.score(x) for x in shuf_a]) - np.array([b.score(x) for x in shuf_b]))
    delta = b.corpus() - a.corpus()
    if delta == 0:
        return 1.0
    return (int(np.sum(diffs > abs(delta))) + 1) / (trials + 1)


def sign_flip(diffs: Sequence[float], trials: int = AR_TRIALS, seed: int = SEED) -> float:
    """Two-sided p of the mean per-pair difference under exchangeability across pairs (Fisher's randomization
    test over data samples / seeds): each pair's B - A keeps its size and its sign is flipped at random; p = the
    share of all 2^n sign patterns (exact) whose |mean| reaches the observed |mean|. Unlike the input-level tests,
    which pool one training run per pair and so see test-set noise only, this one sees the spread between data
    draws; its smallest possible p is 2 / 2^n (0.0625 at n = 5, 0.25 at n = 3), so it needs n >= 6 to reach 0.05.
    Above 16 pairs the 2^n patterns are sampled instead (`trials` seeded draws, p = (count + 1) / (trials + 1))."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("sign_flip: no pairs")
    observed = abs(d.mean())
    if observed == 0:
        return 1.0
    exact = d.size <= 16
    if exact:  # every pattern once, the observed one among them
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(trials, d.size))
    count = int(np.sum(np.abs(signs @ d) / d.size >= observed * (1 - 1e-12)))  # ties up to rounding count
    return count / len(signs) if exact else (count + 1) / (trials + 1)


def _paired(a: Decomposed, b: Decomposed) -> int:
    if a.stats.shape != b.stats.shape:
        raise ValueError(f"{a.name}: the two systems were scored on {len(a.stats)} and {len(b.stats)} inputs; a "
                         f"paired test needs the same inputs")
    return len(a.stats)


def verdict(p: float, alpha: float = ALPHA, p_ar: float | None = None,
            interval: tuple[float, float] | None = None) -> str:
    """"differs" only where every test given agrees: the bootstrap p, the approximate-randomization p and the 95%
    bootstrap interval (which must exclude 0). sacreBLEU's bootstrap p (centred |differences|) and the percentile
    interval can disagree near the threshold; such a case is reported as not separable, saying so."""
    votes = [p < alpha]
    if p_ar is not None:
        votes.append(p_ar < alpha)
    if interval is not None:
        votes.append(interval[0] > 0 or interval[1] < 0)
    if all(votes):
        return f"differs (p < {alpha:g})"
    return "not separable (tests disagree)" if any(votes) else "not separable"


def pooled(parts: Sequence[Decomposed]) -> Decomposed:
    """Several data samples / seeds as one paired set: their inputs stacked (each sample's inputs stay units
    of resampling; the corpus score is over all of them)."""
    return Decomposed(parts[0].name, np.concatenate([p.stats for p in parts]), parts[0].score,
                      parts[0].higher_is_better)
