"""Paired significance tests (src/prefixtuning/significance.py) against independent computations:
- the decomposed corpus metrics score the whole set exactly as the official-equal scorers do;
- paired bootstrap and approximate randomization equal sacreBLEU's own (`paired_bs`, `paired_ar`) given
  sacreBLEU's BLEU statistics and the same seed;
- the bootstrap interval equals a direct computation from the same resampled indices, and a constructed case
  with a known answer comes out as it must.
"""

import numpy as np
import pytest

from prefixtuning import significance as S
from prefixtuning.metrics.ngram import mteval_bleu_nist
from prefixtuning.metrics.ngram import multi_bleu as official_multi_bleu
from prefixtuning.metrics.ter import corpus_ter, ter_segment_stats

REFS = [["the cat sat on the mat", "a cat was sitting on the mat"],
        ["there is a pub near the river", "a pub by the river"],
        ["Blue Spice is a cheap coffee shop", "Blue Spice serves cheap coffee"],
        ["the Mill is a family friendly pub", "the Mill pub is family friendly"],
        ["Aromi is a coffee shop in the city centre", "in the city centre there is Aromi, a coffee shop"],
        ["The Vaults is an expensive restaurant", "The Vaults is a pricey place to eat"]] * 5
A = ["the cat sat on a mat", "a pub near the river", "Blue Spice is a coffee shop", "the Mill is a pub",
     "Aromi is a shop in the centre", "The Vaults is a restaurant"] * 5
B = ["the cat sat on the mat", "there is a pub near the river", "Blue Spice is a cheap coffee shop",
     "the Mill is a family friendly pub", "Aromi is a coffee shop in the city centre",
     "The Vaults is an expensive restaurant"] * 5
B_MIXED = [b if i % 3 else a for i, (a, b) in enumerate(zip(A, B))]


def test_decomposed_metrics_equal_the_official_scores():
    assert S.e2e_bleu(A, REFS).corpus() == pytest.approx(mteval_bleu_nist(A, REFS)["BLEU"], abs=1e-12)
    files = [[g[k] for g in REFS] for k in range(2)]
    for lc in (True, False):
        assert S.multi_bleu(A, files, lc).corpus() == pytest.approx(official_multi_bleu(A, files, lc)["BLEU"],
                                                                      abs=1e-9)
    assert S.ter(A, REFS).corpus() == pytest.approx(corpus_ter(ter_segment_stats(A, REFS)), abs=1e-12)
    # a subset of rows is the official score of that subset
    rows = [0, 3, 4, 9, 17]
    assert S.e2e_bleu(A, REFS).corpus(rows) == pytest.approx(
        mteval_bleu_nist([A[i] for i in rows], [REFS[i] for i in rows])["BLEU"], abs=1e-12)


def test_webnlg_seen_and_unseen_subsets_equal_the_official_subset_scores():
    from prefixtuning.data.triples import WEBNLG_SEEN, WEBNLG_UNSEEN
    from prefixtuning.metrics.tasks import webnlg_metrics

    # the categories as the predictions file stores them (meta); every third input is an unseen category
    meta = [{"category": (WEBNLG_UNSEEN[i % 5] if i % 3 == 0 else WEBNLG_SEEN[i % 10])} for i in range(len(A))]
    refs = [[*g, ""] for g in REFS]  # three reference slots, the third empty, as the reference files have them
    files = [[g[k] for g in refs] for k in range(3)]
    unseen = [i for i in range(len(A)) if i % 3 == 0]
    seen = [i for i in range(len(A)) if i % 3]
    official = webnlg_metrics(A, files, {"seen": seen, "unseen": unseen}, metrics=("BLEU", "TER"))["scores"]
    got = S.task_metrics("webnlg", A, refs, meta)
    assert set(got) == {f"{s}/{m}" for s in ("all", "seen", "unseen") for m in ("BLEU", "TER")}
    for name, d in got.items():
        assert d.corpus() == pytest.approx(official[name], abs=1e-9), name
    assert len(got["unseen/BLEU"].stats) == len(unseen) and not got["unseen/TER"].higher_is_better
    # predictions files without categories (written before they were stored): the "all" scores only
    assert set(S.task_metrics("webnlg", A, refs)) == {"all/BLEU", "all/TER"}


def _sacrebleu_pair(hyps_a, hyps_b):
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    refs = [[g[k] for g in REFS] for k in range(2)]
    sa, sb = (bleu._extract_corpus_statistics(h, refs) for h in (hyps_a, hyps_b))
    score = lambda s: bleu._compute_score_from_stats(list(s)).score  # noqa: E731
    da = S.Decomposed("BLEU", np.array(sa, dtype=float), score)
    db = S.Decomposed("BLEU", np.array(sb, dtype=float), score)
    return bleu, refs, da, db


@pytest.mark.parametrize("hyps_b", [B, B_MIXED], ids=["clearly-better", "mixed"])
def test_paired_bootstrap_and_randomization_equal_sacrebleu(hyps_b):
    from sacrebleu.significance import _paired_ar_test, _paired_bs_test

    bleu, refs, da, db = _sacrebleu_pair(A, hyps_b)
    base = {"BLEU": (np.array(da.stats, dtype="float32"), bleu.corpus_score(A, refs))}
    _, bs = _paired_bs_test(base, "b", hyps_b, refs, {"BLEU": bleu}, n_samples=1000, seed=7)
    ours = S.paired_bootstrap(da, db, n_resamples=1000, seed=7)
    assert ours["p"] == bs["BLEU"].p_value
    assert ours["b"] == pytest.approx(bs["BLEU"].score)
    _, ar = _paired_ar_test(base, "b", hyps_b, refs, {"BLEU": bleu}, n_samples=2000, seed=7)
    assert S.approximate_randomization(da, db, trials=2000, seed=7) == ar["BLEU"].p_value


def test_the_bootstrap_interval_is_the_percentiles_of_the_resampled_differences():
    a, b = S.e2e_bleu(A, REFS), S.e2e_bleu(B_MIXED, REFS)
    r = S.paired_bootstrap(a, b, n_resamples=500, seed=3)
    idx = np.random.default_rng(3).choice(len(A), size=(500, len(A)), replace=True)
    by_hand = [mteval_bleu_nist([B_MIXED[i] for i in rows], [REFS[i] for i in rows])["BLEU"]
               - mteval_bleu_nist([A[i] for i in rows], [REFS[i] for i in rows])["BLEU"] for rows in idx[:40]]
    diffs = [b.corpus(rows) - a.corpus(rows) for rows in idx]
    assert diffs[:40] == pytest.approx(by_hand, abs=1e-12)
    assert (r["low"], r["high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert r["delta"] == pytest.approx(mteval_bleu_nist(B_MIXED, REFS)["BLEU"] - mteval_bleu_nist(A, REFS)["BLEU"])


def test_a_system_against_itself_is_not_separable_and_a_clear_gain_is():
    a = S.e2e_bleu(A, REFS)
    same = S.paired_bootstrap(a, S.e2e_bleu(A, REFS))
    assert same["delta"] == 0 and same["low"] == same["high"] == 0 and same["p"] == 1.0
    assert S.verdict(same["p"]) == "not separable"
    assert S.approximate_randomization(a, S.e2e_bleu(A, REFS), trials=500) == 1.0
    gain = S.paired_bootstrap(a, S.e2e_bleu(B, REFS))
    assert gain["low"] > 0 and gain["p"] < 0.05 and S.verdict(gain["p"]) == "differs (p < 0.05)"
    assert S.approximate_randomization(a, S.e2e_bleu(B, REFS), trials=2000) < 0.05


def test_the_verdict_says_differs_only_where_every_test_agrees():
    assert S.verdict(0.01, p_ar=0.02, interval=(0.001, 0.3)) == "differs (p < 0.05)"
    assert S.verdict(0.01, p_ar=0.02, interval=(-0.3, -0.001)) == "differs (p < 0.05)"
    # sacreBLEU's bootstrap p below the threshold while the percentile interval crosses 0, or AR above it
    assert S.verdict(0.019, p_ar=0.0508, interval=(-0.0034, 0.1333)) == "not separable (tests disagree)"
    assert S.verdict(0.01, p_ar=0.2, interval=(0.001, 0.3)) == "not separable (tests disagree)"
    assert S.verdict(0.2, p_ar=0.01) == "not separable (tests disagree)"
    assert S.verdict(0.2, p_ar=0.3, interval=(-0.1, 0.1)) == "not separable"


def test_sign_flip_across_pairs_against_hand_enumeration():
    # d = (3, -1, 2): the 8 sums of +-3 +-1 +-2 are 6, 2, 4, 0, 0, -4, -2, -6; |sum| >= 4 in 4 of them
    assert S.sign_flip([3.0, -1.0, 2.0]) == 0.5
    # five differences of one sign: only the observed pattern and its mirror reach it, 2 / 32
    assert S.sign_flip([0.01, 0.02, 0.03, 0.04, 0.05]) == 0.0625
    # (1, 1, 1, 1, 1, -5): mean 0 -> no difference, p = 1; (2, 1): |mean| 1.5 reached by 2 of 4 patterns
    assert S.sign_flip([1, 1, 1, 1, 1, -5]) == 1.0 and S.sign_flip([2.0, 1.0]) == 0.5
    # (4, 1, 1): sums 6, 4, 4, 2, -2, -4, -4, -6 -> |sum| >= 6 in 2 of 8
    assert S.sign_flip([4.0, 1.0, 1.0]) == 0.25
    # 25 pairs (sampled patterns): 25 equal positive differences are reached only by the all-plus / all-minus
    # patterns, which 10,000 seeded draws of 2^25 do not hit -> (0 + 1) / (10,000 + 1); mean 0 still gives 1
    assert S.sign_flip([0.1] * 25) == 1 / (S.AR_TRIALS + 1) and S.sign_flip([0.1, -0.1] * 12 + [0.0]) == 1.0
    with pytest.raises(ValueError, match="no pairs"):
        S.sign_flip([])


def test_run_level_metrics_across_six_samples():
    from pathlib import Path

    from prefixtuning.report import Job, across_samples

    # six samples, the row's dev loss lower on every one: only the all-minus pattern and its mirror reach the
    # mean, 2 / 64 < 0.05; NIST up on 3 and down on 3 by the same amount: mean 0, p = 1
    pairs = [(Job(Path(f"a{i}"), {}, {"val/loss": 2.0 + i, "test/NIST": 8.0, "test/BLEU": 0.6}),
              Job(Path(f"b{i}"), {}, {"val/loss": 1.9 + i, "test/NIST": 8.0 + (0.1 if i % 2 else -0.1),
                                       "test/BLEU": 0.7})) for i in range(6)]
    out = across_samples(pairs, tested={"test/BLEU"})
    assert set(out) == {"val/loss", "test/NIST"}
    assert out["val/loss"]["p_pairs"] == 2 / 64 and out["val/loss"]["verdict"] == "differs (p < 0.05)"
    assert out["val/loss"]["signs"] == (0, 6, 0) and out["val/loss"]["delta"] == pytest.approx(-0.1)
    assert out["test/NIST"]["p_pairs"] == 1.0 and out["test/NIST"]["verdict"] == "not separable"


def test_different_inputs_are_refused():
    with pytest.raises(ValueError, match="same inputs"):
        S.paired_bootstrap(S.e2e_bleu(A, REFS), S.e2e_bleu(A[:6], REFS[:6]))


# ------------------------------------------------------------------ the report, as a user runs it
def _job(folder, overrides: dict, hyps, refs, task="e2e", **extra):
    import json

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (folder / "config.yaml").write_text(f"data:\n  name: {task}\n")
    score = mteval_bleu_nist(hyps, refs)["BLEU"]
    (folder / "metrics.json").write_text(json.dumps({"test/BLEU": score, **extra}))
    (folder / "predictions_test.jsonl").write_text("".join(
        json.dumps({"index": i, "input": f"mr {i}", "prediction": h, "references": r}) + "\n"
        for i, (h, r) in enumerate(zip(hyps, refs))))


def test_report_compare_prints_paired_differences_intervals_and_p(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    from conftest import ROOT

    sweep = tmp_path / "sweep"
    systems = {"base": [A, A[6:] + A[:6], A], "better": [B, B, B_MIXED], "same": [A, A[6:] + A[:6], A]}
    # run-level numbers: the dev loss (every run), METEOR (one "better" run lacks it), counts and start values
    dev = {"base": [2.0, 1.5, 1.8], "better": [1.9, 1.4, 1.85], "same": [2.0, 1.5, 1.8]}
    k = 0
    for row, samples in systems.items():
        for sample, hyps in enumerate(samples):
            extra = {"val/loss": dev[row][sample], "val/loss_start": 3.0 + k, "test/inputs": 30.0, "test/n": 30.0}
            if (row, sample) != ("better", 2):
                extra["test/METEOR"] = 0.4 + 0.01 * k
            _job(sweep / str(k), {"row": row, "lowres.sample": sample}, hyps, REFS, **extra)
            k += 1
    r = subprocess.run([sys.executable, "-m", "prefixtuning.report", str(sweep), "--compare", "row=base"],
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paired tests against row=base" in r.stdout and "differs (p < 0.05)" in r.stdout
    rows = {x["row"]: x for x in csv.DictReader(open(sweep / "report" / "significance.csv"))}
    assert set(rows) == {"better", "same"}
    # the pooled test equals significance.py on the stacked inputs of the three pairs
    a = S.pooled([S.e2e_bleu(h, REFS) for h in systems["base"]])
    b = S.pooled([S.e2e_bleu(h, REFS) for h in systems["better"]])
    want = S.paired_bootstrap(a, b)
    got = rows["better"]
    assert float(got["delta"]) == pytest.approx(want["delta"]) and float(got["p_bootstrap"]) == want["p"]
    assert (float(got["low"]), float(got["high"])) == pytest.approx((want["low"], want["high"]))
    assert float(got["p_ar"]) == S.approximate_randomization(a, b)
    assert got["signs"] == "3/0/0" and got["pairs"] == "3" and got["verdict"] == "differs (p < 0.05)"
    # three pairs all positive: across pairs only the all-plus and all-minus patterns reach the mean, 2 / 8
    assert float(got["p_pairs"]) == 0.25 and "| p (pairs) |" in r.stdout
    assert rows["same"]["verdict"] == "not separable" and float(rows["same"]["p_bootstrap"]) == 1.0
    assert "Not tested" in (sweep / "report" / "significance.md").read_text()  # METEOR, CIDEr, ...
    # across samples: dev loss B - A = (-0.1, -0.1, +0.05); of the 8 sums of +-0.1 +-0.1 +-0.05 four reach
    # |-0.15| (0.25, 0.15 and their mirrors): p = 0.5; a metric some pair lacks is named, not tested on fewer
    across = {(x["row"], x["metric"]): x for x in csv.DictReader(open(sweep / "report" / "significance_samples.csv"))}
    assert {m for _, m in across} == {"val/loss", "test/METEOR"}  # not BLEU (tested per input), counts, starts
    loss = across[("better", "val/loss")]
    assert [float(d) for d in loss["per_pair"].split()] == pytest.approx([-0.1, -0.1, 0.05])
    assert float(loss["delta"]) == pytest.approx(-0.05) and float(loss["a"]) == pytest.approx(5.3 / 3)
    assert loss["signs"] == "1/2/0" and float(loss["p_pairs"]) == 0.5 and loss["verdict"] == "not separable"
    assert across[("same", "val/loss")]["p_pairs"] == "1.0" and across[("same", "test/METEOR")]["signs"] == "3/0/0"
    assert across[("better", "test/METEOR")]["verdict"] == "not tested: 1 of the pairs lack it"
    md = (sweep / "report" / "significance.md").read_text()
    assert "Across samples only" in md and "| better | val/loss | 3 | 1.7667 | 1.7167 | -0.0500 |" in md
    bad = subprocess.run([sys.executable, "-m", "prefixtuning.report", str(sweep), "--compare", "prefix=static"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "give KEY=VALUE with KEY one of the swept keys (lowres.sample, row)" in bad.stderr


def test_how_a_command_ran_is_not_a_swept_setting():
    from pathlib import Path

    from prefixtuning.report import Job, swept_keys

    # a sweep re-run with sweep_resume=true (jobs that had stopped) holds the same cells as the first run
    jobs = [Job(Path("0"), {"row": "prefix_static", "lowres.sample": "1"}),
            Job(Path("1"), {"row": "ft", "lowres.sample": "1", "sweep_resume": "true"}),
            Job(Path("2"), {"row": "ft", "lowres.sample": "2", "ckpt_path": "last"})]
    assert swept_keys(jobs) == ["lowres.sample", "row"]
