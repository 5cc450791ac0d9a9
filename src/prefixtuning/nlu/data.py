"""NLU records -> token features -> padded batches, and the Lightning data module of the NLU tasks.

Features per task kind (tokenized for the backbone's own tokenizer; BERT-family token types kept):
    classification   the pair (text_a, text_b), truncated longest-first to data.max_length
    multiple_choice  one pair (text_a, choice) per choice: (B, C, T)
    span             the pair, plus for each span a 0/1 mask over the tokens that overlap its characters
    tagging          the words (pre-split), a label on each word's first sub-token, -100 on the others

Truncation is counted and printed per split; a tagging sentence or a span that truncation would cut is an error
naming the record (its words or span would get no prediction, silently).
"""

from __future__ import annotations

import math
import random

import lightning as L
import torch

from pathlib import Path

from ..atomic import write_lines
from ..data.base import DataError
from ..data.datamodule import PrefixDataModule
from ..data.features import IGNORE
from .tasks import NLURecord, NLUTask


class NLUFeaturizer:
    def __init__(self, task: NLUTask, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, int(max_length)
        self.truncated = 0
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"data={task.name} needs a fast tokenizer (character offsets for spans, word ids for "
                            f"tagging); {type(tokenizer).__name__} is not one")

    def _pair(self, a: str, b: str | None, offsets: bool = False) -> dict:
        full = self.tok(a, b, truncation=False)
        if len(full["input_ids"]) > self.max_length:
            self.truncated += 1
        return self.tok(a, b, truncation=True, max_length=self.max_length, return_offsets_mapping=offsets)

    def __call__(self, r: NLURecord) -> dict:
        kind = self.task.kind
        if kind == "multiple_choice":
            encs = [self._pair(r.text_a, c) for c in r.choices]
            f = {k: [e[k] for e in encs] for k in encs[0].keys()}
            f["labels"] = r.label
            return f
        if kind == "tagging":
            return self._tagging(r)
        enc = self._pair(r.text_a, r.text_b, offsets=kind == "span")
        f = {k: list(v) for k, v in enc.items() if k != "offset_mapping"}
        if kind == "span":
            f["span_masks"] = [self._span_mask(r, enc, seg, a, b) for seg, a, b in r.spans]
        f["labels"] = r.label
        return f

    def _span_mask(self, r: NLURecord, enc, seg: int, start: int, end: int) -> list[int]:
        seq = enc.sequence_ids()
        mask = [int(s == seg and o[0] < end and o[1] > start and o[1] > o[0])
                for s, o in zip(seq, enc["offset_mapping"])]
        if not any(mask):
            raise DataError(f"{r.where}: the span at characters {start}-{end} of segment {seg + 1} has no token left "
                            f"within data.max_length={self.max_length}; raise data.max_length")
        return mask

    def _tagging(self, r: NLURecord) -> dict:
        enc = self.tok(list(r.words), is_split_into_words=True, truncation=False)
        n = len(enc["input_ids"])
        if n > self.max_length:
            raise DataError(f"{r.where}: the sentence of {len(r.words)} words is {n} tokens, more than "
                            f"data.max_length={self.max_length}; raise data.max_length (every word must be tagged)")
        labels, first, seen = [], [], set()
        for w in enc.word_ids():
            if w is None or w in seen:
                labels.append(IGNORE)
                first.append(-1)
            else:
                seen.add(w)
                labels.append(r.tags[w] if r.tags else IGNORE)
                first.append(w)
        if len(seen) != len(r.words):
            raise DataError(f"{r.where}: {len(r.words) - len(seen)} of its words produce no token with this tokenizer")
        f = {k: list(v) for k, v in enc.items()}
        f["labels"] = labels
        f["word_index"] = first
        return f


def collate(pad_id: int):
    """Right-padded batches: input_ids with the pad id, masks / token types / span masks with 0, labels of tagging
    with -100, word_index with -1. Multiple-choice features are (B, C, T)."""
    fill = {"input_ids": pad_id, "labels": IGNORE, "word_index": -1}

    def pad(rows: list[list[int]], value: int, width: int) -> list[list[int]]:
        return [row + [value] * (width - len(row)) for row in rows]

    def fn(batch: list[dict]) -> dict:
        out = {}
        for k in batch[0]:
            vals = [b[k] for b in batch]
            if k == "labels" and not isinstance(vals[0], list):
                out[k] = torch.tensor(vals)
            elif k == "span_masks":
                width = max(len(m) for v in vals for m in v)
                out[k] = torch.tensor([pad(v, 0, width) for v in vals])
            elif isinstance(vals[0][0], list):  # multiple choice: (B, C, T)
                width = max(len(row) for v in vals for row in v)
                out[k] = torch.tensor([pad(v, fill.get(k, 0), width) for v in vals])
            else:
                width = max(len(v) for v in vals)
                out[k] = torch.tensor(pad(vals, fill.get(k, 0), width))
        return out
    return fn


class NLUDataModule(PrefixDataModule):
    """Train / dev / test features of one NLU task; low-resource subsampling (`lowres/`) draws `size` training
    records and a dev set of dev_fraction x size from the task's train split, a pure function of (size, sample).
    The sampler, mid-epoch resume and data-parallel sharding are the generation tasks' (PrefixDataModule)."""

    def __init__(self, cfg, task: NLUTask, tokenizer, seed: int = 0, lowres=None, output_dir=None):
        L.LightningDataModule.__init__(self)
        self.cfg, self.dataset, self.seed = cfg, task, seed
        self.featurizer = NLUFeaturizer(task, tokenizer, cfg.max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = collate(pad)
        self.lowres = lowres if lowres is not None and lowres.get("enabled") else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.splits: dict[str, list[dict]] = {}
        self._records: dict[str, list[NLURecord]] = {}
        self._resume = None

    def records(self, split: str) -> list[NLURecord]:
        if split not in self._records:
            if self.lowres is not None and split in ("train", "dev"):
                self._records.update(self._subsample())
            else:
                recs = self.dataset.records(split)
                limit = self.cfg.get(f"max_{split}_examples")
                self._records[split] = recs[: int(limit)] if limit else recs
        if not self._records[split]:
            raise DataError(f"data={self.dataset.name}: split {split!r} has no records")
        return self._records[split]

    def _subsample(self) -> dict[str, list[NLURecord]]:
        size, sample = int(self.lowres.size), int(self.lowres.sample)
        pool = self.dataset.records("train")
        units = list(dict.fromkeys(self.dataset.unit(r) for r in pool))
        n_dev = math.ceil(size * float(self.lowres.get("dev_fraction", 0.3)))
        if size + n_dev > len(units):
            raise DataError(f"lowres.size={size} + {n_dev} dev records but data={self.dataset.name}'s train split "
                            f"has only {len(units)}")
        random.Random(f"lowres-{self.dataset.name}-{size}-{sample}").shuffle(units)
        train, dev = set(units[:size]), set(units[size:size + n_dev])
        out = {"train": [r for r in pool if self.dataset.unit(r) in train],
               "dev": [r for r in pool if self.dataset.unit(r) in dev]}
        if self.output_dir is not None:
            for k, v in out.items():
                write_lines(self.output_dir / "lowres" / f"{k}.txt", [r.where for r in v])
        return out

    def features(self, split: str) -> list[dict]:
        if split not in self.splits:
            self.splits[split] = [self.featurizer(r) for r in self.records(split)]
            if self.featurizer.truncated:
                print(f"[data] {self.featurizer.truncated} of {len(self.splits[split])} {split} inputs truncated to "
                      f"data.max_length={self.featurizer.max_length} tokens", flush=True)
                self.featurizer.truncated = 0
        return self.splits[split]

    def longest(self, splits=("train", "dev")) -> dict[str, int]:
        n = 0
        for split in splits:
            for f in self.features(split):
                ids = f["input_ids"]
                n = max(n, max(map(len, ids)) if isinstance(ids[0], list) else len(ids))
        return {"encoder": n}
