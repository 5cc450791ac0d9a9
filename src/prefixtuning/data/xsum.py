"""XSUM (Narayan et al. 2018): BBC articles -> one-sentence summaries.

Sources, in order of preference:
  - `documents`: a JSON-lines file with `id`, `document`, `summary` (and optionally `url` /
    `url_section`), e.g. an export of the corpus or the shipped sample;
  - the Hugging Face hub dataset `EdinburghNLP/xsum` when online (`hub: true`, needs `datasets`).
Splits come from the official 90/5/5 file (`split_file`, lists of BBC ids): every id of a used split
must have a document, or loading fails naming the id. Categories for the extrapolation splits come from
the article URL's section (`url_section`, or parsed from `url`, or from the official
`XSum-WebArxiveUrls.txt` given as `urls_file`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..atomic import write_text
from ..metrics import score_task
from .base import DataError, Example, EvalGroup, read_text, register_dataset

SPLIT_NAMES = {"train": "train", "dev": "validation", "test": "test"}


def url_category(url: str) -> tuple[str, str]:
    """(top, section) of a BBC URL: news/world-europe-123 -> (news, world-europe); sport/football/123 ->
    (sport, football). Unknown forms give ("", "")."""
    url = url.split("?")[0].rstrip("/")
    m = re.search(r"bbc\.(?:co\.uk|com)(?::\d+)?/(news|sport)/(.+)$", url)
    if not m:
        return "", ""
    top, rest = m.group(1), m.group(2)
    parts = rest.split("/")
    if top == "sport" and len(parts) >= 2:
        return top, parts[-2]
    last = parts[-1]
    section = re.sub(r"-?\d+$", "", last)
    return top, section


def news_group(section: str) -> str:
    """world-europe -> world, uk-wales -> uk, business-12 -> business."""
    return section.split("-")[0] if section else ""


@register_dataset("xsum")
class XSumData:
    task = "xsum"
    fast_metric_name = "ROUGE-L"

    def __init__(self, data_dir: str | Path | None = None, files: dict | None = None):
        files = dict(files or {})
        if data_dir is None:  # the shipped sample, with its own (non-official) split file
            self.data_dir = Path(__file__).parent / "samples" / "xsum"
            files = {"documents": "articles.jsonl", "split_file": "sample_split.json", **files}
        else:
            self.data_dir = Path(data_dir)
            files = {"documents": "xsum.jsonl", "split_file": "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json", **files}
        self.files = files
        self._docs: dict[str, dict] | None = None
        self._split: dict | None = None

    # ---- loading
    def needed_files(self, splits) -> list[Path]:
        """The split file, the articles (unless read from the hub) and the URL list if configured: every
        split reads them all (checked before any model is built)."""
        keys = ["split_file"] + ([] if self.files.get("hub") else ["documents"])
        keys += ["urls_file"] if self.files.get("urls_file") else []
        return [self.data_dir / self.files[k] for k in keys]

    def _file(self, key: str) -> Path:
        p = self.data_dir / self.files[key]
        if not p.is_file():
            raise DataError(f"XSUM {key} file {p} does not exist")
        return p

    def split_ids(self) -> dict[str, list[str]]:
        if self._split is None:
            p = self._file("split_file")
            try:
                data = json.loads(read_text(p))
            except json.JSONDecodeError as err:
                raise DataError(f"{p}: malformed JSON ({err})") from None
            if not isinstance(data, dict):
                raise DataError(f"{p}: expected an object with train / validation / test id lists")
            missing = [k for k in SPLIT_NAMES.values() if k not in data]
            if missing:
                raise DataError(f"{p}: no {missing} lists (expected train / validation / test)")
            for v in SPLIT_NAMES.values():
                if not isinstance(data[v], list) or not all(isinstance(i, (str, int)) for i in data[v]):
                    raise DataError(f"{p}, field {v!r}: expected a list of document ids")
            self._split = {k: [str(i) for i in data[v]] for k, v in SPLIT_NAMES.items()}
        return self._split

    def _corpus_name(self) -> str:
        return "the hub's EdinburghNLP/xsum" if self.files.get("hub") else str(self.data_dir / self.files["documents"])

    def documents(self) -> dict[str, dict]:
        if self._docs is None:
            if self.files.get("hub"):
                self._docs = self._from_hub()
            else:
                self._docs = self._from_jsonl(self._file("documents"))
            if self.files.get("urls_file"):
                self._add_urls(self._file("urls_file"))
        return self._docs

    def _from_jsonl(self, p: Path) -> dict[str, dict]:
        docs = {}
        for n, line in enumerate(read_text(p).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}, line {n}: malformed JSON ({err})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}, line {n}: expected a JSON object with id, document, summary")
            for key in ("id", "document", "summary"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise DataError(f"{p}, line {n}, field {key!r}: missing, empty or not a string")
            for key in ("url", "url_section", "url_top"):
                if key in rec and not isinstance(rec[key], str):
                    raise DataError(f"{p}, line {n}, field {key!r}: not a string")
            if rec["id"] in docs:
                raise DataError(f"{p}, line {n}, field 'id': {rec['id']!r} appears twice")
            if "url_section" not in rec and rec.get("url"):
                rec["url_top"], rec["url_section"] = url_category(rec["url"])
            docs[rec["id"]] = rec
        return docs

    def _from_hub(self) -> dict[str, dict]:
        try:
            import datasets
        except ImportError:
            raise DataError("loading XSUM from the hub needs the `datasets` package (pip install datasets)") from None
        try:
            ds = datasets.load_dataset("EdinburghNLP/xsum")
        except Exception as err:
            raise DataError(f"could not load EdinburghNLP/xsum from the Hugging Face hub: {err}") from None
        return {r["id"]: dict(r) for split in ds.values() for r in split}

    def _add_urls(self, p: Path) -> None:
        """The official XSum-WebArxiveUrls.txt: one Wayback URL per line, the BBC id at its end."""
        for n, line in enumerate(read_text(p).splitlines(), start=1):
            m = re.search(r"(\d+)/?$", line.strip())
            if not m:
                continue
            doc = self._docs.get(m.group(1))
            if doc is not None:
                doc["url_top"], doc["url_section"] = url_category(line.strip())

    def records(self, split: str) -> list[EvalGroup]:
        if split not in SPLIT_NAMES:
            raise DataError(f"XSUM has no split {split!r}; splits: {', '.join(SPLIT_NAMES)}")
        ids, docs = self.split_ids()[split], self.documents()
        if not ids:
            raise DataError(f"{self.data_dir / self.files['split_file']}: split {split!r} has no examples "
                            f"(its id list is empty)")
        missing = [i for i in ids if i not in docs]
        if missing:
            raise DataError(f"{self.data_dir / self.files['split_file']}: {len(missing)} of the {len(ids)} {split} "
                            f"ids have no document in the corpus (first: id {missing[0]}); the corpus "
                            f"{self._corpus_name()} holds {len(docs)} documents")
        out = []
        for i in ids:
            d = docs[i]
            meta = {"id": i, "url_top": d.get("url_top"), "url_section": d.get("url_section")}
            out.append(EvalGroup(d["document"].strip(), (d["summary"].strip(),), meta))
        return out

    def pairs(self, split: str) -> list[Example]:
        return [Example(g.source, g.references[0], g.meta) for g in self.records(split)]

    def eval_groups(self, split: str) -> list[EvalGroup]:
        return self.records(split)

    # ---- evaluation
    @staticmethod
    def write_references(groups, path) -> None:
        write_text(path, "\n".join(" ".join(g.references[0].split("\n")) for g in groups) + "\n")

    @staticmethod
    def score(groups, hyps) -> dict:

        return score_task("xsum", hyps, [g.references[0] for g in groups])

    @staticmethod
    def fast_metric(groups, hyps) -> float:
        return XSumData.score(groups, hyps)["scores"]["ROUGE-L"]
