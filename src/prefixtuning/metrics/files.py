"""Reading system outputs and references in the official scorers' file formats, with clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError

# WebNLG 2017 test: the first 971 entries are the seen categories, the last 891 the unseen ones.
WEBNLG_TEST_SEEN = 971
WEBNLG_TEST_SIZE = 1862


class ScoreInputError(UserError, ValueError):
    pass


def read_lines(path: str | Path) -> list[str]:
    """Lines of a text file (any line ending), without their newline; every line counts."""
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    return lines


def read_ref_groups_blank_separated(path: str | Path) -> list[list[str]]:
    """e2e-metrics plain-text references: the references of one input on consecutive lines, inputs
    separated by a blank line."""
    groups: list[list[str]] = [[]]
    for line in read_lines(path):
        if line.strip():
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise ScoreInputError(f"{path} holds no references")
    return groups


def _read_csv(path: str | Path, columns: tuple[str, str]) -> list[tuple[str, str, int]]:
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if not set(columns) <= set(header):
            raise ScoreInputError(f"{path}: columns {reader.fieldnames}, expected {', '.join(columns)}")
        key = {h.strip().lower(): h for h in reader.fieldnames}
        return [(row[key[columns[0]]], row[key[columns[1]]] or "", reader.line_num) for row in reader]


def e2e_from_csv(sys_path, ref_path) -> tuple[list[str], list[list[str]]]:
    """e2e-metrics CSV forms: references `mr,ref` (one row per reference), outputs `mr,output`."""
    refs: dict[str, list[str]] = {}
    for mr, ref, line in _read_csv(ref_path, ("mr", "ref")):
        if not ref.strip():
            raise ScoreInputError(f"{ref_path}, line {line}: empty reference")
        refs.setdefault(mr, []).append(ref)
    hyps, groups = [], []
    for mr, out, line in _read_csv(sys_path, ("mr", "output")):
        if mr not in refs:
            raise ScoreInputError(f"{sys_path}, line {line}: MR {mr[:60]!r} has no reference in {ref_path}")
        hyps.append(out)
        groups.append(refs[mr])
    if len(hyps) != len(refs):
        raise ScoreInputError(f"{sys_path} has {len(hyps)} outputs but {ref_path} has {len(refs)} distinct MRs")
    return hyps, groups


def check_same_length(hyp_path, hyps: list, ref_path, n_refs: int, what: str = "lines") -> None:
    if len(hyps) != n_refs:
        raise ScoreInputError(f"{hyp_path} has {len(hyps)} {what} but {ref_path} has {n_refs}; "
                              "they must correspond one to one")
