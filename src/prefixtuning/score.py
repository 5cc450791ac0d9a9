"""Score an existing output file without any model:

    python -m prefixtuning.score --task e2e --hyp outputs.txt --refs refs.txt
    python -m prefixtuning.score --task e2e --hyp outputs.csv --refs testset_w_refs.csv
    python -m prefixtuning.score --task webnlg --hyp out.txt --refs ref0.lex --refs ref1.lex --refs ref2.lex
    python -m prefixtuning.score --task xsum --hyp summaries.txt --refs gold.txt

Prints one JSON object: {"task", "scores", "skipped"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .metrics import score_task
from .metrics.files import (WEBNLG_TEST_SEEN, WEBNLG_TEST_SIZE, ScoreInputError, check_same_length,
                            e2e_from_csv, read_lines, read_ref_groups_blank_separated)


def parse_subsets(specs: list[str]) -> dict[str, range]:
    out = {}
    for spec in specs:
        try:
            name, span = spec.split("=")
            start, end = (int(x) for x in span.split(":"))
        except ValueError:
            raise ScoreInputError(f"--subset {spec!r}: expected NAME=START:END (0-based, end excluded)") from None
        out[name] = range(start, end)
    return out


def score_files(task: str, hyp: str, refs: list[str], subsets: list[str] | None = None) -> dict:
    if not refs:
        raise ScoreInputError("give at least one --refs file")
    for path in (hyp, *refs):  # an empty file would score 0 on every metric and look like a result
        p = Path(path)
        if p.is_file() and not p.read_bytes().strip():
            raise ScoreInputError(f"{path} is empty: nothing to score")
    if task == "e2e":
        if len(refs) != 1:
            raise ScoreInputError("E2E takes one --refs file (CSV with mr,ref or blank-line separated groups)")
        if hyp.endswith(".csv") or refs[0].endswith(".csv"):
            hyps, groups = e2e_from_csv(hyp, refs[0])
        else:
            hyps, groups = read_lines(hyp), read_ref_groups_blank_separated(refs[0])
            check_same_length(hyp, hyps, refs[0], len(groups), "lines")
        result = score_task("e2e", hyps, groups)
    elif task in ("webnlg", "dart"):
        hyps = read_lines(hyp)
        files = [read_lines(r) for r in refs]
        for path, f in zip(refs, files):
            check_same_length(hyp, hyps, path, len(f))
        for i in range(len(hyps)):
            if not any(f[i].strip() for f in files[:3]):
                raise ScoreInputError(f"line {i + 1} of {hyp} has no reference in {', '.join(refs[:3])}")
        if task == "webnlg":
            subs = parse_subsets(subsets or [])
            if not subs and len(hyps) == WEBNLG_TEST_SIZE:  # the official 2017 test set order
                subs = {"seen": range(0, WEBNLG_TEST_SEEN), "unseen": range(WEBNLG_TEST_SEEN, WEBNLG_TEST_SIZE)}
            result = score_task("webnlg", hyps, files, subsets=subs)
        else:
            result = score_task("dart", hyps, files)
    elif task == "xsum":
        if len(refs) != 1:
            raise ScoreInputError("XSUM takes one --refs file (one summary per line)")
        hyps, gold = read_lines(hyp), read_lines(refs[0])
        check_same_length(hyp, hyps, refs[0], len(gold))
        result = score_task("xsum", hyps, gold)
    else:
        raise ScoreInputError(f"unknown task {task!r}")
    return {"task": task, **result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prefixtuning.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=["e2e", "webnlg", "dart", "xsum"])
    ap.add_argument("--hyp", required=True, help="system outputs")
    ap.add_argument("--refs", action="append", default=[], help="reference file (repeat per reference index)")
    ap.add_argument("--subset", action="append", default=[], help="WebNLG: NAME=START:END lines to score apart")
    args = ap.parse_args(argv)
    try:
        result = score_files(args.task, args.hyp, args.refs, args.subset)
    except (ScoreInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
