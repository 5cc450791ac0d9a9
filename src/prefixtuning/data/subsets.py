"""Low-resource subsampling and category (extrapolation) splits, applied on top of any dataset.

Low-resource (Li & Liang 2021, Sec. 6.3): `size` training pairs and a dev set of round(0.3 * size)
pairs, both drawn from the training split, disjoint (no input of the dev set occurs in the training
set), and a pure function of (size, sample): the same arguments always give the same examples.

Category splits (Sec. 6.4, Table 4): training and dev data keep the records whose category is in
`train`, the test data those in `test`. A record without the category field fails loudly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..atomic import write_lines
from .base import DataError, Example


def record_category(meta: dict, field: str):
    if field == "news_group":  # XSUM within-news: the first part of the URL section of news articles
        if meta.get("url_top") is None:
            return None
        return (meta.get("url_section") or "").split("-")[0] if meta["url_top"] == "news" else f"({meta['url_top']})"
    return meta.get(field)


def filter_by_category(items: list, field: str, keep, dataset: str, split: str) -> list:
    if not keep:
        return items
    keep = set(keep)
    out = []
    for it in items:
        cat = record_category(it.meta, field)
        if cat is None:
            ident = it.meta.get("id") or it.meta.get("eid") or it.source[:60]
            hint = (" (XSUM categories come from the article URLs: add `url`/`url_section` to the documents or "
                    "give data.files.urls_file=XSum-WebArxiveUrls.txt)" if dataset == "xsum" else "")
            raise DataError(f"{dataset} {split} record {ident} has no {field!r} information, which the "
                            f"category split needs{hint}")
        if cat in keep:
            out.append(it)
    if not out:
        raise DataError(f"no {dataset} {split} record has a {field} in {sorted(keep)}")
    return out


def lowres_subsample(pairs: list[Example], size: int, sample: int, dev_fraction: float = 0.3):
    """(train, dev) lists of pairs; deterministic in (size, sample), disjoint by input."""
    size = int(size)
    n_dev = round(dev_fraction * size)
    if size < 1:
        raise DataError(f"lowres.size must be positive, got {size}")
    rng = random.Random(f"lowres-{size}-{sample}")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    if len(order) < size:
        raise DataError(f"lowres.size={size} but the training split has only {len(pairs)} pairs")
    train = [pairs[i] for i in order[:size]]
    seen = {ex.source for ex in train}
    dev = []
    for i in order[size:]:
        if len(dev) == n_dev:
            break
        if pairs[i].source not in seen:
            dev.append(pairs[i])
    if len(dev) < n_dev:
        raise DataError(f"lowres: only {len(dev)} dev pairs with inputs unseen in training, {n_dev} needed")
    return train, dev


def write_pairs(pairs: list[Example], path: Path) -> None:
    write_lines(path, (json.dumps({"source": ex.source, "target": ex.target}, ensure_ascii=False) for ex in pairs))
