"""E2E NLG Challenge (Novikova et al. 2017): restaurant meaning representations -> text.

Reads the official CSV files (`mr,ref`; the challenge input file `testset.csv` has only `MR`) and
linearizes an MR exactly as the Prefix-Tuning paper's files (src1_*.txt) do:
`name[The Vaults], eatType[pub], priceRange[cheap]` -> `name : The Vaults | Type : pub | price : cheap`
(eatType -> Type, priceRange -> price, familyFriendly -> family friendly; the rest unchanged).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..metrics import score_task
from ..metrics.ngram import mteval_bleu_nist
from .base import DataError, Example, group_references, read_text, register_dataset

# attribute[value]: neither may hold a bracket, so `name[The Eagle, eatType[pub]` (a slot left open) is an
# error instead of the value "The Eagle, eatType[pub"
_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")
# The paper's files rename one attribute; all others keep their official names.
_RENAME = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")


@dataclass(frozen=True)
class E2ERow:
    mr: str
    ref: str | None
    line: int


def sample_dir() -> Path:
    return Path(__file__).parent / "samples" / "e2e"


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`name[X], eatType[pub]` -> [("name", "X"), ("eatType", "pub")]; raises ValueError if malformed."""
    slots, pos = [], 0
    text = mr.strip()
    while pos < len(text):
        m = _SLOT.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse {text[pos:pos + 40]!r} as attribute[value]")
        attr, value = m.group(1).strip(), m.group(2).strip()
        if attr not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attr!r} (E2E has {', '.join(ATTRIBUTES)})")
        slots.append((attr, value))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"expected ',' after {m.group(0).strip()!r}")
            pos += 1
    if not slots:
        raise ValueError("empty meaning representation")
    return slots


def linearize_mr(mr: str) -> str:
    return " | ".join(f"{_RENAME.get(a, a)} : {v}" for a, v in parse_mr(mr))


def read_e2e_csv(path: str | Path) -> list[E2ERow]:
    """Rows of an official E2E CSV; a malformed row raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"E2E file {path} does not exist")
    rows = []
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header 'mr,ref')") from None
        if header not in (["mr", "ref"], ["mr"]):
            raise DataError(f"{path}, line 1: header is {header}, expected 'mr,ref' or 'MR'")
        start = 2
        joined: list[str] = []
        try:
            for fields in reader:
                line = start
                start = reader.line_num + 1
                if not fields or fields == [""]:
                    raise DataError(f"{path}, line {line}: empty row")
                if len(fields) != len(header):
                    raise DataError(f"{path}, line {line}: {len(fields)} fields, expected {len(header)} "
                                    f"({','.join(header)})")
                try:
                    parse_mr(fields[0])
                except ValueError as err:
                    raise DataError(f"{path}, line {line}, field mr: malformed MR: {err}") from None
                for k, (name, value) in enumerate(zip(header, fields)):
                    if "\x00" in value:
                        raise DataError(f"{path}, line {line}, field {name}: a NUL byte")
                    if "\n" in value or "\r" in value:
                        # a quoted line break (the official trainset.csv has one, line 15766): every reference
                        # file and prediction file is one line per text, so it is joined with a space, and said
                        fields[k] = " ".join(value.split())
                        joined.append(f"line {line}, field {name}")
                ref = fields[1] if len(header) == 2 else None
                if ref is not None and not ref.strip():
                    raise DataError(f"{path}, line {line}, field ref: empty reference")
                rows.append(E2ERow(fields[0], ref, line))
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: {err}") from None
    if joined:
        print(f"[data] {path}: {len(joined)} value(s) held a line break, joined with a space ({', '.join(joined[:3])}"
              f"{', ...' if len(joined) > 3 else ''})", flush=True)
    return rows


@register_dataset("e2e")
class E2EData:
    """The E2E splits under `data_dir` (defaults to the shipped sample)."""

    default_files = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}

    def __init__(self, data_dir: str | Path | None = None, files: dict | None = None):
        if data_dir is None:
            self.data_dir = sample_dir()
            self.files = {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}
        else:
            self.data_dir = Path(data_dir)
            self.files = dict(files or self.default_files)
        self._pairs: dict[str, list[Example]] = {}

    def path(self, split: str) -> Path:
        if split not in self.files:
            raise DataError(f"E2E has no split {split!r}; configured splits: {', '.join(self.files)}")
        return self.data_dir / self.files[split]

    def needed_files(self, splits) -> list[Path]:
        """The files a run on `splits` reads (checked before any model is built)."""
        return [self.path(s) for s in splits]

    def pairs(self, split: str) -> list[Example]:
        if split in self._pairs:  # read once (the pre-flight check reads every split before the model loads)
            return list(self._pairs[split])
        rows = read_e2e_csv(self.path(split))
        if not rows:
            raise DataError(f"{self.path(split)}: split {split!r} has no examples (a header and no rows)")
        if rows[0].ref is None:
            raise DataError(f"{self.path(split)} has no references (MR column only); use testset_w_refs.csv")
        self._pairs[split] = [Example(linearize_mr(r.mr), r.ref.strip()) for r in rows]
        return list(self._pairs[split])

    def eval_groups(self, split: str):
        """Inputs with all their references, in the official order (testset.csv's MR order)."""
        return group_references(self.pairs(split))

    # ---- evaluation: the official scorer's formats and metrics
    task = "e2e"
    fast_metric_name = "BLEU"

    @staticmethod
    def write_references(groups, path) -> None:
        """e2e-metrics plain-text form: one reference per line, inputs separated by a blank line."""
        write_text(path, "\n\n".join("\n".join(g.references) for g in groups) + "\n")

    @staticmethod
    def score(groups, hyps) -> dict:

        return score_task("e2e", hyps, [list(g.references) for g in groups])

    @staticmethod
    def fast_metric(groups, hyps) -> float:
        """The E2E BLEU of MT-Eval (no Java): what validation logs during training."""

        return mteval_bleu_nist(hyps, [list(g.references) for g in groups])["BLEU"]
