"""Triple-set-to-text data: WebNLG 2017 (Gardent et al. 2017) and DART v1.1.1 (Nan et al. 2021).

Inputs are linearized as the Prefix-Tuning paper does: `subject : property : object | ...`, the
triples in file order. Both read the official XML (`<entry category eid size>` with `<mtriple>s | p | o`
and `<lex>` references) and the JSON forms (WebNLG: the PrefixTuning/LoRA `{"entries": [...]}` files;
DART: the official list of `{"tripleset", "annotations"}`). Training uses every (input, reference)
pair; evaluation keeps the records in file order (the official order) with all their references.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..atomic import write_text
from ..metrics import score_task
from ..metrics.ngram import multi_bleu
from ..metrics.tasks import webnlg_normalize
from .base import DataError, EvalGroup, pairs_of, read_text, register_dataset

# WebNLG 2017 categories (the challenge's evaluation.py): seen in train/dev, and test-only.
WEBNLG_SEEN = ("Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam",
               "University", "WrittenWork")
WEBNLG_UNSEEN = ("Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician")


def linearize_triples(triples: list[tuple[str, str, str]]) -> str:
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def _split_triple(text: str, where: str) -> tuple[str, str, str]:
    parts = [p.strip() for p in (text or "").split(" | ")]
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise DataError(f"{where}: triple {text!r} does not have three parts 'subject | property | object'")
    return parts[0], parts[1], parts[2]


def read_triples_xml(path: Path, triple_tag: str = "mtriple") -> list[EvalGroup]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML ({err})") from None
    records = []
    for n, entry in enumerate(root.iter("entry"), start=1):
        eid = entry.get("eid") or f"#{n}"
        where = f"{path}, entry {eid}"
        triples = [_split_triple(t.text, where) for t in entry.iter(triple_tag)]
        if not triples:
            raise DataError(f"{where}: no <{triple_tag}> triples")
        refs = tuple((lex.text or "").strip() for lex in entry.iter("lex"))
        if not refs:
            raise DataError(f"{where}: no <lex> reference, so it can be neither trained on nor scored; fix or "
                            f"remove the entry")
        meta = {"category": entry.get("category"), "eid": eid, "size": entry.get("size"), "file": path.name,
                "sources": tuple(lex.get("comment") for lex in entry.iter("lex"))}
        records.append(EvalGroup(linearize_triples(triples), refs, meta))
    if not records:
        raise DataError(f"{path}: no <entry> elements")
    return records


def _load_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err})") from None


def read_webnlg_json(path: Path) -> list[EvalGroup]:
    data = _load_json(path)
    if not isinstance(data, dict) or "entries" not in data:
        raise DataError(f"{path}: expected an object with 'entries' (the PrefixTuning/LoRA WebNLG format)")
    records = []
    for n, item in enumerate(data["entries"], start=1):
        if not isinstance(item, dict) or len(item) != 1:
            raise DataError(f"{path}, record {n}: expected {{\"<id>\": entry}}")
        (key, e), = item.items()
        where = f"{path}, record {n} (id {key})"
        try:
            triples = [(t["subject"], t["property"], t["object"]) for t in e["modifiedtripleset"]]
            lexes = e["lexicalisations"]
            category = e["category"]
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: missing field {err}") from None
        if not isinstance(lexes, list) or not lexes:
            raise DataError(f"{where}, field 'lexicalisations': no reference, so the record can be neither trained "
                            f"on nor scored; fix or remove it")
        for k, lex in enumerate(lexes):
            if not isinstance(lex, dict) or not isinstance(lex.get("lex"), str):
                raise DataError(f"{where}, field 'lexicalisations'[{k}]: expected an object with a string 'lex'")
        if not all(isinstance(x, str) for t in triples for x in t):
            raise DataError(f"{where}, field 'modifiedtripleset': subject, property and object must be strings")
        refs = tuple(lex["lex"].strip() for lex in lexes)
        for t in triples:
            if not t[0] or not t[1]:
                raise DataError(f"{where}: triple {t} does not have three parts")
        if not triples:
            raise DataError(f"{where}: empty modifiedtripleset")
        meta = {"category": category, "eid": e.get("xml_id", key), "size": e.get("size"), "file": path.name}
        records.append(EvalGroup(linearize_triples(triples), refs, meta))
    return records


def read_dart_json(path: Path) -> list[EvalGroup]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{'tripleset', 'annotations'}} records (DART JSON)")
    records = []
    for n, e in enumerate(data, start=1):
        where = f"{path}, record {n}"
        try:
            raw, annotations = e["tripleset"], e["annotations"]
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: missing field {err}") from None
        if not isinstance(annotations, list) or not annotations:
            raise DataError(f"{where}, field 'annotations': no annotation, so the record can be neither trained on "
                            f"nor scored; fix or remove it")
        for k, a in enumerate(annotations):
            if not isinstance(a, dict) or not isinstance(a.get("text"), str):
                raise DataError(f"{where}, field 'annotations'[{k}]: expected an object with a string 'text', got "
                                f"{a!r:.80}")
        refs = tuple(a["text"].strip() for a in annotations)
        sources = tuple(a.get("source") for a in annotations)
        if not isinstance(raw, list):
            raise DataError(f"{where}, field 'tripleset': expected a list of [subject, property, object]")
        triples = []
        for t in raw:
            if not isinstance(t, list) or len(t) != 3:
                raise DataError(f"{where}: triple {t!r} does not have three parts")
            triples.append(tuple(str(x) for x in t))
        if not triples:
            raise DataError(f"{where}: empty tripleset")
        records.append(EvalGroup(linearize_triples(triples), refs, {"eid": str(n), "sources": sources,
                                                                    "file": path.name}))
    return records


def dart_normalize(text: str) -> str:
    """DART's reference files: lower-cased and split at non-word characters (no transliteration)."""
    return " ".join(" ".join(re.split(r"(\W)", text.strip())).lower().split())  # split first, then lower


class TripleData:
    """Shared loader: `files` maps a split to a file (.xml / .json) or a folder of XML files (sorted).

    A family sets its readers, files and how outputs and references are normalized for its official
    scorer (`normalize`, and whether multi-bleu lower-cases: `bleu_lowercase`)."""

    json_reader = staticmethod(read_webnlg_json)
    default_files: dict = {}
    sample_name = ""
    sample_files = {"train": "train.xml", "dev": "dev.xml", "test": "test.xml"}
    normalize = staticmethod(webnlg_normalize)
    bleu_lowercase = True

    def __init__(self, data_dir: str | Path | None = None, files: dict | None = None):
        if data_dir is None:
            self.data_dir = Path(__file__).parent / "samples" / self.sample_name
            self.files = dict(self.sample_files)
        else:
            self.data_dir = Path(data_dir)
            self.files = dict(files or self.default_files)
        self._cache: dict[str, list[EvalGroup]] = {}

    def needed_files(self, splits) -> list[Path]:
        """The files (or XML folders) a run on `splits` reads (checked before any model is built)."""
        out = []
        for s in splits:
            if s not in self.files:
                raise DataError(f"{self.name} has no split {s!r}; configured splits: {', '.join(self.files)}")
            out.append(self.data_dir / self.files[s])
        return out

    def path(self, split: str) -> Path:
        if split not in self.files:
            raise DataError(f"{self.name} has no split {split!r}; configured splits: {', '.join(self.files)}")
        p = self.data_dir / self.files[split]
        if not p.exists():
            raise DataError(f"{self.name} {split} file {p} does not exist")
        return p

    def records(self, split: str) -> list[EvalGroup]:
        if split not in self._cache:
            p = self.path(split)
            if p.is_dir():
                paths = sorted(p.glob("**/*.xml"))
                if not paths:
                    raise DataError(f"{p} holds no XML files")
                recs = [r for q in paths for r in read_triples_xml(q)]
            elif p.suffix == ".json":
                recs = self.json_reader(p)
            else:
                recs = read_triples_xml(p)
            self._cache[split] = recs
        return self._cache[split]

    def pairs(self, split: str):
        pairs = pairs_of(self.records(split))
        for ex in pairs:
            if not ex.target:  # cannot be a training target; evaluation keeps it as an empty reference
                raise DataError(f"{self.path(split)}, entry {ex.meta.get('eid')}: empty reference in the "
                                f"{split} split; fix or remove it before training on this split")
        return pairs

    def eval_groups(self, split: str) -> list[EvalGroup]:
        return self.records(split)

    # ---- evaluation
    @classmethod
    def reference_files(cls, groups, n_refs: int = 3) -> list[list[str]]:
        """Per-reference-index files as the official scripts read them ('' where an input has fewer)."""
        return [[cls.normalize(g.references[k]) if k < len(g.references) else "" for g in groups]
                for k in range(n_refs)]

    def write_references(self, groups, path) -> None:
        path = Path(path)
        for k, lines in enumerate(self.reference_files(groups, n_refs=max(len(g.references) for g in groups))):
            write_text(path.parent / f"{path.stem}{k}.lex", "\n".join(lines) + "\n")

    fast_metric_name = "BLEU"

    def fast_metric(self, groups, hyps) -> float:

        return multi_bleu([self.normalize(h) for h in hyps], self.reference_files(groups),
                          lowercase=self.bleu_lowercase)["BLEU"]


@register_dataset("webnlg")
class WebNLGData(TripleData):
    task = "webnlg"
    sample_name = "webnlg"
    default_files = {"train": "challenge_2017_xml/train", "dev": "challenge_2017_xml/dev",
                     "test": "challenge_2017_xml/test/testdata_with_lex.xml"}
    json_reader = staticmethod(read_webnlg_json)

    def score(self, groups, hyps) -> dict:
        """BLEU / METEOR / TER for all inputs and for the seen and unseen categories."""

        cats = [g.meta.get("category") for g in groups]
        unknown = sorted({c for c in cats if c not in WEBNLG_SEEN + WEBNLG_UNSEEN})
        if unknown:
            raise DataError(f"WebNLG categories {unknown} are neither seen nor unseen 2017 categories")
        subsets = {"seen": [i for i, c in enumerate(cats) if c in WEBNLG_SEEN],
                   "unseen": [i for i, c in enumerate(cats) if c in WEBNLG_UNSEEN]}
        subsets = {k: v for k, v in subsets.items() if v}
        return score_task("webnlg", hyps, self.reference_files(groups), subsets=subsets)


@register_dataset("dart")
class DARTData(TripleData):
    task = "dart"
    sample_name = "dart"
    default_files = {"train": "dart-v1.1.1-full-train.json", "dev": "dart-v1.1.1-full-dev.json",
                     "test": "dart-v1.1.1-full-test.xml"}
    json_reader = staticmethod(read_dart_json)
    sample_files = {"train": "train.json", "dev": "dev.json", "test": "test.xml"}
    normalize = staticmethod(dart_normalize)
    bleu_lowercase = False  # run_eval_on_dart.sh runs multi-bleu without -lc

    def score(self, groups, hyps) -> dict:
        """DART's official BLEU (multi-bleu), METEOR, TER against the first 3 references; outputs are
        lower-cased and tokenized as the official reference files are."""

        return score_task("dart", [self.normalize(h) for h in hyps], self.reference_files(groups))
