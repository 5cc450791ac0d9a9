"""Metric parity with the official scorers on their own example files, file formats, bad input."""

import csv
import math
import json
import shutil
import sys
from pathlib import Path

import pytest

from prefixtuning.metrics import score_task
from prefixtuning.metrics.files import ScoreInputError, read_lines, read_ref_groups_blank_separated
from prefixtuning.metrics.ngram import mteval_bleu_nist, mteval_tokens, multi_bleu
from prefixtuning.score import main as score_main, score_files

pytestmark = pytest.mark.fast  # the inner-loop tier (make test-fast)

FX = Path(__file__).parent / "fixtures" / "metric_parity"
E2E_SYS, E2E_REFS = FX / "e2e_example_system.txt", FX / "e2e_example_references.txt"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 and the PTB tokenizer need Java")


def webnlg_refs(which):
    return [str(FX / f"gold-{which}-cat-reference{k}.lex") for k in range(3)]


def test_e2e_bleu_nist_parity():
    hyps, refs = read_lines(E2E_SYS), read_ref_groups_blank_separated(E2E_REFS)
    assert len(hyps) == len(refs) == 10
    perl = mteval_bleu_nist(hyps, refs)
    assert abs(perl["BLEU"] - 0.7203) <= 0.001
    assert abs(perl["NIST"] - 7.8212) <= 0.001  # the Perl MT-Eval the paper's numbers come from
    port = mteval_bleu_nist(hyps, refs, nist_ref_length="per_input")
    assert abs(port["NIST"] - 7.7889) <= 0.001  # e2e-metrics' Python port (-p)


@needs_java
def test_e2e_all_metrics_parity_through_the_cli(capsys):
    assert score_main(["--task", "e2e", "--hyp", str(E2E_SYS), "--refs", str(E2E_REFS)]) == 0
    out = json.loads(capsys.readouterr().out)
    official = {"BLEU": 0.7203, "NIST": 7.8212, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}
    for name, value in official.items():
        assert abs(out["scores"][name] - value) <= 0.001, (name, out["scores"][name])
    assert out["skipped"] == {}


@needs_java
def test_e2e_csv_forms_give_the_same_numbers(tmp_path):
    hyps, refs = read_lines(E2E_SYS), read_ref_groups_blank_separated(E2E_REFS)
    ref_csv, sys_csv = tmp_path / "refs.csv", tmp_path / "sys.csv"
    with open(ref_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        for i, group in enumerate(refs):
            for r in group:
                w.writerow([f"name[R{i}]", r])
    with open(sys_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "output"])
        for i, h in enumerate(hyps):
            w.writerow([f"name[R{i}]", h])
    a = score_files("e2e", str(E2E_SYS), [str(E2E_REFS)])
    b = score_files("e2e", str(sys_csv), [str(ref_csv)])
    assert a["scores"] == b["scores"]


@needs_java
def test_webnlg_parity_all_seen_unseen():
    hyp = str(FX / "webnlg_test_bart_large_system.txt")
    hyps = read_lines(hyp)
    files = [read_lines(f) for f in webnlg_refs("all")]
    res = score_task("webnlg", hyps, files, subsets={"seen": range(971), "unseen": range(971, 1862)},
                     metrics=("BLEU", "METEOR"))["scores"]
    for subset, bleu, meteor in (("all", 58.06, 0.430), ("seen", 64.51, 0.458), ("unseen", 50.20, 0.398)):
        assert abs(res[f"{subset}/BLEU"] - bleu) <= 0.2, (subset, res[f"{subset}/BLEU"])
        assert abs(res[f"{subset}/METEOR"] - meteor) <= 0.005, (subset, res[f"{subset}/METEOR"])
    # the seen / unseen reference files of the official setup give the same subset BLEU
    from prefixtuning.metrics.tasks import webnlg_normalize
    norm = [webnlg_normalize(h) for h in hyps]
    old = multi_bleu(norm[:971], [read_lines(f) for f in webnlg_refs("old")])["BLEU"]
    new = multi_bleu(norm[971:], [read_lines(f) for f in webnlg_refs("new")])["BLEU"]
    assert old == pytest.approx(res["seen/BLEU"], abs=1e-9) and new == pytest.approx(res["unseen/BLEU"], abs=1e-9)


def test_java_missing_skips_with_a_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    hyps, refs = read_lines(E2E_SYS), read_ref_groups_blank_separated(E2E_REFS)
    res = score_task("e2e", hyps, refs)
    assert set(res["scores"]) == {"BLEU", "NIST"}
    for name in ("METEOR", "ROUGE_L", "CIDEr"):
        assert name in res["skipped"] and "Java is not installed" in res["skipped"][name]


@pytest.mark.parametrize("task, module, pip, skipped, kept", [
    ("e2e", "pycocoevalcap", "pycocoevalcap", {"METEOR", "ROUGE_L", "CIDEr"}, {"BLEU", "NIST"}),
    ("webnlg", "unidecode", "Unidecode", {"all/BLEU", "all/METEOR", "all/TER"}, set()),
    ("xsum", "rouge_score", "rouge-score", {"ROUGE-1", "ROUGE-2", "ROUGE-L"}, set()),
])
def test_missing_python_package_skips_with_a_sentence_naming_it(monkeypatch, task, module, pip, skipped, kept):
    """A metric package that is not installed is named, and only its metrics are skipped: no traceback after
    training, no wrong number."""
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    hyps = ["the cat sat on the mat", "a dog"]
    refs = {"e2e": [["the cat sat on a mat"], ["the dog"]], "webnlg": [["the cat sat on a mat", "the dog"]],
            "xsum": ["the cat sat on a mat", "the dog"]}[task]
    res = score_task(task, hyps, refs)
    assert set(res["scores"]) == kept and set(res["skipped"]) == skipped
    for reason in res["skipped"].values():
        assert f"the Python package `{pip}` is not installed" in reason and f"pip install {pip}" in reason


def test_mteval_tokenization_rules():
    assert mteval_tokens("The Vaults, a pub. Price: £20-25 near Café 1.5 &amp; 3,000") == [
        "the", "vaults", ",", "a", "pub", ".", "price", ":", "£20", "-", "25", "near", "café", "1.5", "&", "3,000"]
    assert mteval_tokens("ÉCOLE") == ["École"]  # the script lower-cases ASCII letters only


def test_multi_bleu_by_hand():
    # p = 5/5, 3/4, 2/3, 1/2; BP = exp(1 - 6/5)
    expected = 100 * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 6 / 5)
    assert multi_bleu(["the cat sat on mat"], [["the cat sat on the mat"]])["BLEU"] == pytest.approx(expected)
    # no trigram matches -> 0 (multi-bleu does not smooth)
    assert multi_bleu(["the mat sat on cat"], [["the cat sat on the mat"]])["BLEU"] == 0.0
    # p = 6/6, 5/5, 4/4, 3/3, hyp 6 vs closest ref 6 -> 100
    assert multi_bleu(["the cat sat on the mat"], [["the cat sat on the mat"], ["a dog"]])["BLEU"] == pytest.approx(100)
    # closest reference length, shorter on a tie: hyp 4 words, refs of 3 and 5 -> 3 (BP = 1)
    r = multi_bleu(["a b c d"], [["a b c"], ["a b c d e"]])
    assert r["ref_len"] == 3


def test_xsum_rouge_by_hand():
    # ROUGE-1: P = 3/3, R = 3/6 -> F = 2/3; ROUGE-2: P = 2/2, R = 2/5 -> F = 4/7
    s = score_task("xsum", ["the cat sat"], ["the cat sat on the mat"])["scores"]
    assert s["ROUGE-1"] == pytest.approx(2 / 3) and s["ROUGE-2"] == pytest.approx(4 / 7)
    # stemming: "running" and "runs" both stem to "run"
    assert score_task("xsum", ["dogs running"], ["dog runs"])["scores"]["ROUGE-1"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["webnlg", "dart", "xsum"])
def test_wrong_number_of_lines_names_files_and_counts(tmp_path, task):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("a\nb\nc\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a\nb\n")
    with pytest.raises(ScoreInputError) as err:
        score_files(task, str(hyp), [str(ref)])
    assert f"{hyp} has 3 lines but {ref} has 2" in str(err.value)


def test_e2e_wrong_counts_and_empty_references(tmp_path):
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("a\nb\nc\n")
    with pytest.raises(ScoreInputError, match=r"hyp.txt has 3 lines but .*e2e_example_references.txt has 10"):
        score_files("e2e", str(hyp), [str(E2E_REFS)])
    ref = tmp_path / "ref0.lex"
    ref.write_text("x\n\ny\n")
    with pytest.raises(ScoreInputError, match=r"line 2 of .*hyp.txt has no reference"):
        score_files("webnlg", str(hyp), [str(ref)])
    with pytest.raises(ScoreInputError, match="does not exist"):
        score_files("xsum", str(hyp), [str(tmp_path / "missing.txt")])
    empty = tmp_path / "refs.txt"
    empty.write_text("\n\n")
    with pytest.raises(ScoreInputError, match=r"refs.txt is empty: nothing to score"):
        score_files("e2e", str(hyp), [str(empty)])
    with pytest.raises(ScoreInputError, match=r"refs.txt is empty: nothing to score"):  # as hypotheses too
        score_files("xsum", str(empty), [str(hyp)])
