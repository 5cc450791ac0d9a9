"""TER with tercom 0.7.25 semantics, as sacrebleu 2.x ports them (case-insensitive, no normalization, the
best of the references for the edits, their average length as the denominator).

Corpus TER = sum(edits) / sum(average reference length) over segments, so segments are scored
independently and summed per subset.

The segment computation is a re-implementation of sacrebleu's `lib_ter.translation_edit_rate`, written
over integer word ids so that numba can compile it (about two orders of magnitude faster than the pure
Python original on DART). It keeps every rule that decides the result: the beam around the
length-ratio diagonal, the order in which edit operations win ties, the order in which shift candidates
are enumerated and ranked (gain, then length, then earliest start, then earliest target), the limits of
10 words per shift, 50 positions of shift distance and 1,000 shift candidates per segment and reference.
Only the cache differs: sacrebleu keeps a trie of matrix rows, this code restarts each candidate from
the unchanged prefix of the current hypothesis; matrix rows depend only on the prefix, so the numbers
are the same. `tests/test_ter.py` checks equality with sacrebleu on generated worst cases and
`benchmarks/metrics_table_to_text.py` on the full WebNLG and DART test sets.

Without numba the same functions run as plain Python (correct, slower).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_MAX_SHIFT_SIZE = 10
_MAX_SHIFT_DIST = 50
_BEAM_WIDTH = 25
_MAX_SHIFT_CANDIDATES = 1000
_INF = 10 ** 16
# edit operations in the matrix (sacrebleu: ' ', 's', 'i', 'd', 'x')
_NOP, _SUB, _INS, _DEL, _UNDEF = 0, 1, 2, 3, 4

try:  # compiled when numba is installed (a declared dependency); plain Python otherwise
    import numba

    _jit = numba.njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover - exercised only without numba
    def _jit(fn):
        return fn


@_jit
def _fill_rows(h, r, start, cost, op, band_lo, band_hi):
    """Rows start+1..len(h) of the edit-distance matrix (row `start` must be filled). Cells outside the
    beam stay at infinity, as in sacrebleu's BeamEditDistance._edit_distance."""
    n_h = h.shape[0]
    n_r = r.shape[0]
    for i in range(start + 1, n_h + 1):
        for j in range(n_r + 1):
            cost[i, j] = _INF
            op[i, j] = _UNDEF
        for j in range(band_lo[i], band_hi[i]):
            if j == 0:
                cost[i, 0] = cost[i - 1, 0] + 1
                op[i, 0] = _DEL
            else:
                best = cost[i, j]
                best_op = op[i, j]
                if h[i - 1] == r[j - 1]:
                    c = cost[i - 1, j - 1]
                    o = _NOP
                else:
                    c = cost[i - 1, j - 1] + 1
                    o = _SUB
                if best > c:
                    best = c
                    best_op = o
                c = cost[i - 1, j] + 1
                if best > c:
                    best = c
                    best_op = _DEL
                c = cost[i, j - 1] + 1
                if best > c:
                    best = c
                    best_op = _INS
                cost[i, j] = best
                op[i, j] = best_op
    return cost[n_h, n_r]


@_jit
def _bands(n_h, n_r):
    """The beam [lo, hi) of matrix columns computed in each row (sacrebleu's pseudo-diagonal)."""
    lo = np.zeros(n_h + 1, dtype=np.int64)
    hi = np.zeros(n_h + 1, dtype=np.int64)
    ratio = n_r / n_h if n_h > 0 else 1.0
    if _BEAM_WIDTH < ratio / 2:
        width = math.ceil(ratio / 2 + _BEAM_WIDTH)
    else:
        width = _BEAM_WIDTH
    for i in range(1, n_h + 1):
        diag = math.floor(i * ratio)
        lo[i] = max(0, diag - width)
        hi[i] = min(n_r + 1, diag + width)
        if i == n_h:
            hi[i] = n_r + 1
    return lo, hi


@_jit
def _alignment(op, n_h, n_r, align, ref_err, hyp_err):
    """Back-trace the matrix and turn the trace into sacrebleu's alignment and error flags (its trace
    is flipped to rewrite the reference into the hypothesis; here the flip is folded in)."""
    # collect the trace backwards, then walk it forwards
    trace = np.empty(n_h + n_r, dtype=np.int64)
    k = 0
    i = n_h
    j = n_r
    while i > 0 or j > 0:
        o = op[i, j]
        trace[k] = o
        k += 1
        if o == _SUB or o == _NOP:
            i -= 1
            j -= 1
        elif o == _INS:
            j -= 1
        elif o == _DEL:
            i -= 1
        else:
            raise ValueError("TER: the edit-distance trace left the beam")
    pos_h = -1
    pos_r = -1
    for t in range(k - 1, -1, -1):
        o = trace[t]
        if o == _NOP or o == _SUB:
            pos_h += 1
            pos_r += 1
            align[pos_r] = pos_h
            e = 0 if o == _NOP else 1
            hyp_err[pos_h] = e
            ref_err[pos_r] = e
        elif o == _DEL:      # flipped: an insertion into the hypothesis
            pos_h += 1
            hyp_err[pos_h] = 1
        else:                # _INS, flipped: a deletion from the reference side
            pos_r += 1
            align[pos_r] = pos_h
            ref_err[pos_r] = 1


@_jit
def _perform_shift(words, start, length, target, out):
    """sacrebleu's _perform_shift (list slicing, clamped at the end as Python slices are)."""
    n = words.shape[0]
    k = 0
    if target < start:
        segs = ((0, target), (start, start + length), (target, start), (start + length, n))
    elif target > start + length:
        segs = ((0, start), (start + length, target), (start, start + length), (target, n))
    else:
        segs = ((0, start), (start + length, length + target), (start, start + length), (length + target, n))
    for a, b in segs:
        b = min(b, n)
        for x in range(a, b):
            out[k] = words[x]
            k += 1


@_jit
def _ter_edits(h, r):
    """Number of edits (shifts + edit distance) to turn hypothesis ids h into reference ids r."""
    n_h = h.shape[0]
    n_r = r.shape[0]
    if n_r == 0:
        return n_h
    lo, hi = _bands(n_h, n_r)
    cost = np.empty((n_h + 1, n_r + 1), dtype=np.int64)
    op = np.empty((n_h + 1, n_r + 1), dtype=np.int64)
    for j in range(n_r + 1):
        cost[0, j] = j
        op[0, j] = _INS
    s_cost = cost.copy()
    s_op = op.copy()
    align = np.zeros(n_r, dtype=np.int64)
    ref_err = np.zeros(n_r, dtype=np.int64)
    hyp_err = np.zeros(n_h, dtype=np.int64)
    cand = np.empty(n_h, dtype=np.int64)
    best_words = np.empty(n_h, dtype=np.int64)
    cur = h.copy()
    shifts = 0
    checked = 0
    while True:
        # one round of sacrebleu's _shift: the best single shift of `cur`
        pre = _fill_rows(cur, r, 0, cost, op, lo, hi)
        _alignment(op, n_h, n_r, align, ref_err, hyp_err)
        have_best = False
        b_gain = 0
        b_len = 0
        b_neg_start = 0
        b_neg_idx = 0
        stop = False
        for start_h in range(n_h):
            if stop:
                break
            for start_r in range(n_r):
                if stop:
                    break
                if abs(start_r - start_h) > _MAX_SHIFT_DIST:
                    continue
                length = 0
                while cur[start_h + length] == r[start_r + length] and length < _MAX_SHIFT_SIZE:
                    length += 1
                    # --- one candidate pair (start_h, start_r, length) ---
                    skip = True
                    for x in range(start_h, start_h + length):
                        if hyp_err[x] != 0:
                            skip = False
                    if not skip:
                        skip = True
                        for x in range(start_r, start_r + length):
                            if ref_err[x] != 0:
                                skip = False
                    if not skip and start_h <= align[start_r] < start_h + length:
                        skip = True
                    if not skip:
                        prev_idx = -1
                        for offset in range(-1, length):
                            pos = start_r + offset
                            if pos == -1:
                                idx = 0
                            elif pos < n_r:
                                idx = align[pos] + 1
                            else:
                                break
                            if idx == prev_idx:
                                continue
                            prev_idx = idx
                            _perform_shift(cur, start_h, length, idx, cand)
                            keep = min(start_h, idx)
                            for j in range(n_r + 1):
                                s_cost[keep, j] = cost[keep, j]
                                s_op[keep, j] = op[keep, j]
                            gain = pre - _fill_rows(cand, r, keep, s_cost, s_op, lo, hi)
                            checked += 1
                            better = False
                            if not have_best:
                                better = True
                            elif gain != b_gain:
                                better = gain > b_gain
                            elif length != b_len:
                                better = length > b_len
                            elif -start_h != b_neg_start:
                                better = -start_h > b_neg_start
                            elif -idx != b_neg_idx:
                                better = -idx > b_neg_idx
                            if better:
                                have_best = True
                                b_gain = gain
                                b_len = length
                                b_neg_start = -start_h
                                b_neg_idx = -idx
                                for x in range(n_h):
                                    best_words[x] = cand[x]
                        if checked >= _MAX_SHIFT_CANDIDATES:
                            stop = True
                            break
                    # --- end of candidate ---
                    if n_h == start_h + length or n_r == start_r + length:
                        break
        delta = b_gain if have_best else 0
        if checked >= _MAX_SHIFT_CANDIDATES:
            break
        if delta <= 0:
            break
        shifts += 1
        for x in range(n_h):
            cur[x] = best_words[x]
    return shifts + _fill_rows(cur, r, 0, cost, op, lo, hi)


_KERNEL = _ter_edits


def _ids(words: list[str], vocab: dict) -> np.ndarray:
    return np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)


def segment_stats(hyp: str, refs: Sequence[str], kernel=None) -> tuple[int, float]:
    """(best number of edits over the references, average reference length) for one output, after
    sacrebleu's default tercom tokenization (lower-case, whitespace split)."""
    kernel = kernel or _KERNEL
    vocab: dict[str, int] = {}
    h = _ids(hyp.rstrip().lower().split(), vocab)
    best = _INF
    total = 0
    for ref in refs:
        r = _ids(ref.rstrip().lower().split(), vocab)
        edits = int(kernel(h, r))
        total += r.shape[0]
        if edits < best:
            best = edits
    return best, total / len(refs)


def ter_segment_stats(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> list[tuple[int, float]]:
    if len(hyps) != len(refs):
        raise ValueError(f"TER: {len(hyps)} outputs but {len(refs)} reference groups")
    return [segment_stats(h, g) for h, g in zip(hyps, refs)]


def corpus_ter(stats) -> float:
    edits = sum(e for e, _ in stats)
    length = sum(r for _, r in stats)
    return edits / length if length > 0 else (1.0 if edits > 0 else 0.0)
