"""Shared data types and the dataset registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

DATASETS: dict[str, type] = {}


def register_dataset(name: str):
    def deco(cls):
        cls.name = name
        DATASETS[name] = cls
        return cls
    return deco


class DataError(UserError, ValueError):
    """Malformed or missing data; the message names the file and the line or record."""


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text. Bytes that are not UTF-8 raise DataError naming the file, line and
    column, never a bare UnicodeDecodeError; every reader of every dataset goes through here."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}, line {line}, column {col}: bytes {raw[err.start:err.end]!r} are not UTF-8 "
                        f"({err.reason}); the official files are UTF-8") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first field


@dataclass(frozen=True)
class Example:
    """One training pair: a linearized input and one reference. `meta` carries record information such
    as the category (WebNLG), the URL section (XSUM) or the record id."""
    source: str
    target: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class EvalGroup:
    """One evaluation input with all of its references, in first-seen order."""
    source: str
    references: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def group_references(pairs: list[Example]) -> list[EvalGroup]:
    """Group pairs by source string (not by adjacency: equal sources are not always consecutive)."""
    order: dict[str, list[str]] = {}
    meta: dict[str, dict] = {}
    for ex in pairs:
        order.setdefault(ex.source, []).append(ex.target)
        meta.setdefault(ex.source, ex.meta)
    return [EvalGroup(s, tuple(refs), meta[s]) for s, refs in order.items()]


def pairs_of(groups: list[EvalGroup]) -> list[Example]:
    """Every (input, reference) pair of record-based data, for training."""
    return [Example(g.source, r, g.meta) for g in groups for r in g.references]
