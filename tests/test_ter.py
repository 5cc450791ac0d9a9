"""The compiled TER equals sacrebleu's TER (the tercom port it replaced) segment by segment.

Independent computations: sacrebleu's `TER.sentence_score` for each segment, and its `corpus_score` for
the corpus statistic. The generated cases use 2-5 word vocabularies, where repeated words make many
shift candidates and ties (the rules most likely to be ported wrong), plus empty and very unequal
lengths (the widened beam)."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import TER

from prefixtuning.metrics import ter as T
from prefixtuning.metrics.files import read_lines
from prefixtuning.metrics.tasks import groups_from_files, webnlg_normalize

FX = Path(__file__).parent / "fixtures" / "metric_parity"
SACRE = TER()


def sacre_stats(hyp, refs):
    s = SACRE.sentence_score(hyp, list(refs))
    return s.num_edits, s.ref_length


def words(vocab, max_len):
    return st.lists(st.sampled_from(vocab), max_size=max_len).map(" ".join)


@st.composite
def segment(draw):
    vocab = draw(st.sampled_from([["a", "b"], ["a", "b", "c"], ["x", "y", "z", "w", "v"], ["A", "a", "the", "."]]))
    hyp = draw(words(vocab, draw(st.sampled_from([3, 12, 40]))))
    refs = draw(st.lists(words(vocab, draw(st.sampled_from([3, 12, 40, 130]))), min_size=1, max_size=3))
    return hyp, refs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segment())
def test_segment_equals_sacrebleu(case):
    hyp, refs = case
    assert T.segment_stats(hyp, refs) == sacre_stats(hyp, refs)


@pytest.mark.parametrize("hyp, refs", [
    ("", ["a b c"]), ("a b c", [""]), ("", [""]), ("a b", ["", "a b"]),
    ("one " * 3, ["one " * 200]),                   # ratio 67: the beam widens past 25
    ("a b c d e f g h i j k l", ["g h i j k l a b c d e f"]),  # a 6-word block moved 6 places
    ("The cat SAT .", ["the cat sat ."]),             # case-insensitive
    (" ".join([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]),  # two 10-word blocks swapped:
     [" ".join([f"b{i}" for i in range(10)] + [f"a{i}" for i in range(10)])]),  # shifts move at most 10
    (" ".join(f"t{i}" for i in range(60)) + " far", ["far " + " ".join(f"t{i}" for i in range(60))]),  # 60 away
])
def test_edge_cases_equal_sacrebleu(hyp, refs):
    assert T.segment_stats(hyp, refs) == sacre_stats(hyp, refs)


def test_shift_candidate_limit_equals_sacrebleu():
    """Long repetitive segments reach the 1,000-candidate limit, after which the last shift is dropped."""
    hyp = " ".join("abcab"[i % 5] for i in range(90))
    ref = " ".join("bacba"[i % 5] for i in range(95))
    assert T.segment_stats(hyp, [ref]) == sacre_stats(hyp, [ref])


def test_real_outputs_segments_and_corpus_equal_sacrebleu():
    """The first 250 BART-large WebNLG outputs, normalized as the challenge does, with 3 references."""
    hyps = [webnlg_normalize(h) for h in read_lines(FX / "webnlg_test_bart_large_system.txt")][:250]
    files = [read_lines(FX / f"gold-all-cat-reference{k}.lex")[:250] for k in range(3)]
    groups = groups_from_files(files)
    ours = T.ter_segment_stats(hyps, groups)
    assert ours == [sacre_stats(h, g) for h, g in zip(hyps, groups)]
    # sacrebleu's corpus score takes full reference streams: the inputs with 3 references
    full = [i for i, g in enumerate(groups) if len(g) == 3]
    assert len(full) > 100
    corpus = SACRE.corpus_score([hyps[i] for i in full], [[groups[i][k] for i in full] for k in range(3)]).score
    assert T.corpus_ter([ours[i] for i in full]) * 100 == pytest.approx(corpus, abs=1e-9)


def test_plain_python_path_equals_compiled():
    """Without numba the same functions run as Python; both give the same edits."""
    kernel = getattr(T._ter_edits, "py_func", None)
    if kernel is None:
        pytest.skip("numba is not installed: only the plain path exists")
    for hyp, ref in [("a b c d", "c d a b"), ("x y x y x", "y x y x y x"), ("", "a"), ("the cat", "a dog")]:
        assert T.segment_stats(hyp, [ref], kernel=kernel) == T.segment_stats(hyp, [ref])


def test_mismatched_counts_name_both():
    with pytest.raises(ValueError, match="2 outputs but 1 reference groups"):
        T.ter_segment_stats(["a", "b"], [["a"]])
