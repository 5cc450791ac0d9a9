"""The NLU tasks' metrics, as their reference scorers define them.

    accuracy     share of inputs whose label is right
    f1_macro     CB: the unweighted mean over the three classes of each class's F1 (a class never predicted and
                 never gold scores 0, as scikit-learn's f1_score(average="macro") with its default)
    f1a / em     MultiRC: F1a, binary F1 of the "true" class over every answer option; EM, the share of
                 questions whose options are all right
    f1 / precision / recall
                 NER: entity-level micro scores over exact chunks (type and boundaries), chunks read as conlleval
                 reads them (so IOB1 and IOB2 are both handled: a chunk starts at B-X, at I-X after O or after
                 another type, and ends where the next one starts or at O)

tests/test_nlu.py checks them against scikit-learn and seqeval (conlleval's default mode) on fixtures.
All values are fractions in [0, 1]; reports print them x 100 where papers do.
"""

from __future__ import annotations

from collections import defaultdict


def accuracy(gold: list[int], pred: list[int]) -> float:
    _same_length(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def _f1(tp: int, fp: int, fn: int) -> float:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def f1_macro(gold: list[int], pred: list[int], n_labels: int) -> float:
    _same_length(gold, pred)
    scores = []
    for c in range(n_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / n_labels


def multirc(gold: list[int], pred: list[int], groups: list[str]) -> dict[str, float]:
    _same_length(gold, pred)
    tp = sum(g == 1 and p == 1 for g, p in zip(gold, pred))
    fp = sum(g == 0 and p == 1 for g, p in zip(gold, pred))
    fn = sum(g == 1 and p == 0 for g, p in zip(gold, pred))
    by_q: dict[str, bool] = {}
    for g, p, q in zip(gold, pred, groups):
        by_q[q] = by_q.get(q, True) and g == p
    return {"f1a": _f1(tp, fp, fn), "em": sum(by_q.values()) / len(by_q), "accuracy": accuracy(gold, pred)}


def chunks(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of every entity in a tag sequence (IOB1 or IOB2), conlleval's way."""
    out, start, kind = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, typ = (t[0], t[2:]) if t != "O" else ("O", None)
        ends = kind is not None and (prefix in ("O", "B") or typ != kind)
        if ends:
            out.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and kind is None:
            start, kind = i, typ
    return out


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over the entities of all sentences, and per type (f1_<type>)."""
    _same_length(gold, pred)
    counts = defaultdict(lambda: [0, 0, 0])  # type -> tp, fp, fn
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        gc, pc = chunks(g), chunks(p)
        for c in gc & pc:
            counts[c[0]][0] += 1
        for c in pc - gc:
            counts[c[0]][1] += 1
        for c in gc - pc:
            counts[c[0]][2] += 1
    tp, fp, fn = (sum(v[k] for v in counts.values()) for k in range(3))
    out = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
           "f1": _f1(tp, fp, fn)}
    out.update({f"f1_{t}": _f1(*v) for t, v in sorted(counts.items())})
    return out


def _same_length(gold, pred) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no inputs to score")
