"""Task metrics, each computed as the task's official scorer does (see ngram.py, java.py).

Every function returns {"scores": {name: value}, "skipped": {name: reason}}; a metric whose
dependency is missing (Java, a jar, a model, a Python package) is listed under "skipped" with a sentence, never
reported with a wrong value.

E2E      tuetschek/e2e-metrics: BLEU, NIST (MT-Eval v13a, significance variant), and METEOR 1.5,
         ROUGE_L, CIDEr (coco-caption, after its PTB tokenization). BLEU/NIST on a 0-1 scale as the
         script prints them.
WebNLG   the WebNLG 2017 challenge scripts (as Li & Liang ran them): outputs lower-cased, transliterated
         to ASCII and split at non-word characters; BLEU = multi-bleu.perl -lc with the first 3
         references; METEOR 1.5 (-norm) with the same 3; TER (tercom 0.7.25 semantics, sacrebleu's port).
DART     Yale-LILY/dart run_eval_on_dart.sh: BLEU = multi-bleu.perl (case-sensitive) on the raw outputs
         with 3 reference files; METEOR (-norm), TER; MoverScore / BERTScore / BLEURT need their models.
XSUM     ROUGE-1/2/L F1 from the rouge-score package with the Porter stemmer, averaged over documents.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

from . import java as J
from .ngram import mteval_bleu_nist, multi_bleu
from .ter import corpus_ter, ter_segment_stats

TASK_METRICS: dict[str, Callable] = {}


def register_task(name: str):
    def deco(fn):
        TASK_METRICS[name] = fn
        return fn
    return deco


def score_task(task: str, hyps: Sequence[str], refs, **kwargs) -> dict:
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(sorted(TASK_METRICS))}")
    return TASK_METRICS[task](hyps, refs, **kwargs)


def _result():
    return {"scores": {}, "skipped": {}}


def _try(result: dict, names: Sequence[str], fn: Callable[[], dict]) -> None:
    try:
        result["scores"].update(fn())
    except J.MissingDependency as err:
        for n in names:
            result["skipped"][n] = f"{n} skipped: {err}"


def _module(name: str, pip: str):
    """A metric's Python dependency, or MissingDependency naming the package to install (the metric is then
    reported under "skipped"; the run and its predictions are kept)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise J.MissingDependency(f"the Python package `{pip}` is not installed ({err}); "
                                  f"pip install {pip}, or `pip install -e .` for the pinned versions") from None


def _skip_all(names: Sequence[str], err: Exception) -> dict:
    out = _result()
    out["skipped"] = {n: f"{n} skipped: {err}" for n in names}
    return out


def check_refs(hyps: Sequence[str], groups: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(groups):
        raise ValueError(f"{len(hyps)} outputs but {len(groups)} inputs with references")
    for i, g in enumerate(groups):
        if not any(r.strip() for r in g):
            raise ValueError(f"input {i + 1} has no (non-empty) reference")


def groups_from_files(ref_files: Sequence[Sequence[str]], n_refs: int | None = None) -> list[list[str]]:
    """Per-reference-index files (empty line = no reference) -> non-empty references per input."""
    files = ref_files[:n_refs] if n_refs else ref_files
    return [[f[i] for f in files if f[i].strip()] for i in range(len(files[0]))]


@register_task("e2e")
def e2e_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]], nist_ref_length: str = "per_set") -> dict:
    """refs[i]: every reference of input i."""
    check_refs(hyps, refs)
    out = _result()
    out["scores"].update(mteval_bleu_nist(hyps, refs, nist_ref_length=nist_ref_length))

    def coco() -> dict:
        _module("pycocoevalcap", "pycocoevalcap")
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        h = J.ptb_tokenize(hyps)
        flat = J.ptb_tokenize([r for g in refs for r in g])
        it = iter(flat)
        r = [[next(it) for _ in g] for g in refs]
        gts = {i: r[i] for i in range(len(h))}
        res = {i: [h[i]] for i in range(len(h))}
        return {"METEOR": J.meteor(h, r), "ROUGE_L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}

    _try(out, ["METEOR", "ROUGE_L", "CIDEr"], coco)
    return out


def webnlg_normalize(text: str) -> str:
    """The challenge's preprocessing of system outputs: ASCII, lower case, split at non-word chars."""
    unidecode = _module("unidecode", "Unidecode").unidecode

    t = unidecode(text.strip())
    t = " ".join(re.split(r"(\W)", unidecode(t.lower())))
    return " ".join(t.split())


def _java_meteor(result: dict, hyps, groups, subsets: dict[str, list[int]], prefix: bool) -> None:
    """METEOR for each subset from one METEOR process (segment statistics computed once)."""
    try:
        with J.Meteor() as m:
            stats = [m.segment_stats(h, g) for h, g in zip(hyps, groups)]
            for name, idx in subsets.items():
                result["scores"][f"{name}/METEOR" if prefix else "METEOR"] = m.corpus([stats[i] for i in idx])
    except J.MissingDependency as err:
        for name in subsets:
            key = f"{name}/METEOR" if prefix else "METEOR"
            result["skipped"][key] = f"METEOR skipped: {err}"


def _table_to_text(hyps, ref_files, subsets, n_refs: int, lowercase: bool, metrics, prefix: bool) -> dict:
    files = list(ref_files[:n_refs])
    groups = groups_from_files(files)
    check_refs(hyps, groups)
    out = _result()
    key = (lambda name, m: f"{name}/{m}") if prefix else (lambda name, m: m)
    if "BLEU" in metrics:
        for name, idx in subsets.items():
            out["scores"][key(name, "BLEU")] = multi_bleu([hyps[i] for i in idx], [[f[i] for i in idx] for f in files],
                                                         lowercase=lowercase)["BLEU"]
    if "METEOR" in metrics:
        _java_meteor(out, hyps, groups, subsets, prefix)
    if "TER" in metrics:
        stats = ter_segment_stats(hyps, groups)
        for name, idx in subsets.items():
            out["scores"][key(name, "TER")] = corpus_ter([stats[i] for i in idx])
    return out


TABLE_METRICS = ("BLEU", "METEOR", "TER")


@register_task("webnlg")
def webnlg_metrics(hyps: Sequence[str], ref_files: Sequence[Sequence[str]],
                   subsets: dict[str, Sequence[int]] | None = None, n_refs: int = 3,
                   metrics: Sequence[str] = TABLE_METRICS) -> dict:
    """ref_files[k][i]: k-th reference of input i ('' if none). subsets: name -> input indices
    (e.g. seen / unseen); "all" is always reported. Scores are keyed "<subset>/<metric>"."""
    subsets = {"all": range(len(hyps)), **(subsets or {})}
    subsets = {k: list(v) for k, v in subsets.items()}
    try:
        norm = [webnlg_normalize(h) for h in hyps]
    except J.MissingDependency as err:  # every metric scores the normalized outputs
        return _skip_all([f"{s}/{m}" for s in subsets for m in metrics], err)
    return _table_to_text(norm, ref_files, subsets, n_refs, True, metrics, prefix=True)


@register_task("dart")
def dart_metrics(hyps: Sequence[str], ref_files: Sequence[Sequence[str]], n_refs: int = 3,
                 metrics: Sequence[str] = TABLE_METRICS) -> dict:
    out = _table_to_text(list(hyps), ref_files, {"all": list(range(len(hyps)))}, n_refs, False, metrics,
                         prefix=False)
    for name, why in (("MoverScore", "its BERT model and the moverscore package"),
                      ("BERTScore", "a RoBERTa-large model from the Hugging Face hub"),
                      ("BLEURT", "a BLEURT checkpoint")):
        out["skipped"][name] = f"{name} skipped: it needs {why}, which is not available offline here"
    return out


@register_task("xsum")
def xsum_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} summaries but {len(refs)} references")
    empty = [i + 1 for i, r in enumerate(refs) if not r.strip()]
    if empty:
        raise ValueError(f"{len(empty)} empty reference summaries (first at line {empty[0]})")
    try:
        rouge_scorer = _module("rouge_score.rouge_scorer", "rouge-score")
    except J.MissingDependency as err:
        return _skip_all(["ROUGE-1", "ROUGE-2", "ROUGE-L"], err)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"ROUGE-1": 0.0, "ROUGE-2": 0.0, "ROUGE-L": 0.0}
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)
        totals["ROUGE-1"] += s["rouge1"].fmeasure
        totals["ROUGE-2"] += s["rouge2"].fmeasure
        totals["ROUGE-L"] += s["rougeL"].fmeasure
    out = _result()
    out["scores"] = {k: v / max(len(hyps), 1) for k, v in totals.items()}
    return out
