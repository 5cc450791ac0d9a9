"""APT's and P-tuning v2's NLU tasks, read from their official files: SuperGLUE (CB, COPA, RTE, WiC, WSC, BoolQ,
MultiRC; jsonl) and NER (CoNLL-2003 English, IOB1 columns; CoNLL04, BIO tab columns).

Every record becomes one `NLURecord` or a DataError naming the file, the line and the field. The tasks are
registered in the same dataset registry as E2E/WebNLG/DART/XSUM (`data=rte`), so `data.*`, `lowres/`, the
download command and the config check treat them alike.

Splits. SuperGLUE's test sets have no labels, so the official validation file is this project's `test` split,
and `dev` (model selection, learning rates) is carved from the training file: a fixed share
(`data.dev_fraction`) drawn with a seed of its own, the same for every run seed. The NER corpora have their own
dev and test files (CoNLL-2003 eng.testa / eng.testb; CoNLL04 dev.txt / test.txt).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data.base import DATASETS, DataError, read_text, register_dataset

KINDS = ("classification", "multiple_choice", "span", "tagging")


@dataclass(frozen=True)
class NLURecord:
    """One input of an NLU task. `where`: file and line, for every later error about it.

    text_a / text_b: the (pair of) segments; choices: multiple choice (COPA), each encoded with text_a;
    spans: span tasks, (segment 0 | 1, start char, end char) per span; words / tags: tagging (tags in IOB2);
    group: the unit a task scores together (MultiRC: the question of an answer option)."""
    where: str
    label: int | None = None
    text_a: str = ""
    text_b: str | None = None
    choices: tuple[str, ...] = ()
    spans: tuple[tuple[int, int, int], ...] = ()
    words: tuple[str, ...] = ()
    tags: tuple[int, ...] = ()
    group: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}: not a JSON record ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise DataError(f"{path} holds no records")
    return out


def _get(obj: dict, name: str, types, where: str):
    """obj[name] (a dotted name reads nested objects), of one of `types`, or a DataError naming the field."""
    cur = obj
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise DataError(f"{where}: field {name!r} is missing")
        cur = cur[part]
    if isinstance(cur, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataError(f"{where}: field {name!r} is {cur!r}, expected {_names(types)}")
    if not isinstance(cur, types):
        raise DataError(f"{where}: field {name!r} is {type(cur).__name__} {cur!r:.60}, expected {_names(types)}")
    return cur


def _names(types) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


class NLUTask:
    """A task's files, label set, input kind and metrics. Subclasses implement `read(path)`."""

    name = "?"
    kind = "classification"
    source = "superglue"  # the download command's dataset that holds the files
    labels: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric = "accuracy"
    folder = ""
    default_files = {"train": "train.jsonl", "test": "val.jsonl"}  # no `dev`: carved from train
    # the metric that model selection and the experiment tables read (val/<main_metric>, test/<main_metric>)

    def __init__(self, data_dir: str | Path | None = None, files: dict | None = None, dev_fraction: float = 0.1):
        if data_dir is None:
            raise DataError(f"data={self.name}: data.data_dir is not set (the folder of the official {self.folder} "
                            f"files)")
        self.data_dir = Path(data_dir)
        self.files = {**self.default_files, **(files or {})}
        self.dev_fraction = float(dev_fraction)
        self._cache: dict[str, list[NLURecord]] = {}

    @property
    def fast_metric_name(self) -> str:
        return self.main_metric

    def path(self, split: str) -> Path:
        name = self.files.get("train" if split == "dev" and "dev" not in self.files else split)
        if name is None:
            raise DataError(f"data={self.name} has no {split!r} split (its files: {self.files})")
        return self.data_dir / name

    def needed_files(self, splits) -> list[Path]:
        return list(dict.fromkeys(self.path(s) for s in splits))

    def records(self, split: str) -> list[NLURecord]:
        """The records of a split: train and dev partition the training file when the task has no dev file."""
        if split in self._cache:
            return self._cache[split]
        if split in ("train", "dev") and "dev" not in self.files:
            every = self.read(self.path("train"))
            # the unit drawn: a record, or (MultiRC) a passage with all its questions and answer options
            units = list(dict.fromkeys(self.unit(r) for r in every))
            random.Random(f"{self.name}-dev-split").shuffle(units)
            dev = set(units[:max(1, round(self.dev_fraction * len(units)))])
            self._cache["dev"] = [r for r in every if self.unit(r) in dev]
            self._cache["train"] = [r for r in every if self.unit(r) not in dev]
        else:
            self._cache[split] = self.read(self.path(split))
        return self._cache[split]

    def read(self, path: Path) -> list[NLURecord]:
        raise NotImplementedError

    def unit(self, record: NLURecord):
        """What the dev split and low-resource subsampling draw (records that must stay together share it)."""
        return record.where

    def label_index(self, value, where: str, field_name: str = "label") -> int:
        key = str(value).lower() if isinstance(value, bool) else str(value)
        if key not in self.labels:
            raise DataError(f"{where}: field {field_name!r} is {value!r}, not one of {', '.join(self.labels)}")
        return self.labels.index(key)


# ---------------------------------------------------------------------------------------------- SuperGLUE
class _PairTask(NLUTask):
    a_field, b_field = "premise", "hypothesis"

    def read(self, path):
        out = []
        for n, obj in _jsonl(path):
            where = f"{path}, line {n}"
            out.append(NLURecord(where, self.label_index(_get(obj, "label", (str, bool), where), where),
                                 text_a=_get(obj, self.a_field, str, where), text_b=_get(obj, self.b_field, str, where),
                                 meta={"idx": obj.get("idx")}))
        return out


@register_dataset("cb")
class CB(_PairTask):
    folder = "CB"
    labels = ("entailment", "contradiction", "neutral")
    metrics = ("accuracy", "f1_macro")
    main_metric = "accuracy"


@register_dataset("rte")
class RTE(_PairTask):
    folder = "RTE"
    labels = ("entailment", "not_entailment")


@register_dataset("boolq")
class BoolQ(_PairTask):
    """Question first, passage second (truncated first when too long). The mirror and the download have the
    official validation file only: a run needs a train.jsonl of its own (data.files.train)."""
    folder = "BoolQ"
    a_field, b_field = "question", "passage"
    labels = ("false", "true")


@register_dataset("copa")
class COPA(NLUTask):
    """Multiple choice: the premise paired with each alternative, joined by the relation the question asks for
    ("because" for a cause, "so" for an effect); the head scores each pair, softmax over the two."""
    folder = "COPA"
    kind = "multiple_choice"
    labels = ("choice1", "choice2")
    CONNECTORS = {"cause": "because", "effect": "so"}

    def read(self, path):
        out = []
        for n, obj in _jsonl(path):
            where = f"{path}, line {n}"
            q = _get(obj, "question", str, where)
            if q not in self.CONNECTORS:
                raise DataError(f"{where}: field 'question' is {q!r}, not one of cause, effect")
            label = _get(obj, "label", int, where)
            if label not in (0, 1):
                raise DataError(f"{where}: field 'label' is {label!r}, not 0 or 1")
            c = self.CONNECTORS[q]
            choices = tuple(f"{c} {_lower_first(_get(obj, k, str, where))}" for k in ("choice1", "choice2"))
            out.append(NLURecord(where, label, text_a=_get(obj, "premise", str, where), choices=choices,
                                 meta={"idx": obj.get("idx")}))
        return out


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:1].isupper() and not s[:2].isupper() else s


@register_dataset("wic")
class WiC(NLUTask):
    """Word-in-context as the SuperGLUE BERT baseline frames it: the two sentences as a pair, and the classifier
    reads the pooled pair and each sentence's occurrence of the word (its tokens' mean)."""
    folder = "WiC"
    kind = "span"
    labels = ("false", "true")

    def read(self, path):
        out = []
        for n, obj in _jsonl(path):
            where = f"{path}, line {n}"
            s1, s2 = _get(obj, "sentence1", str, where), _get(obj, "sentence2", str, where)
            spans = []
            for seg, (s, a, b) in enumerate(((s1, "start1", "end1"), (s2, "start2", "end2"))):
                start, end = _get(obj, a, int, where), _get(obj, b, int, where)
                if not 0 <= start < end <= len(s):
                    raise DataError(f"{where}: fields {a!r}/{b!r} = {start}/{end} are not a span of the "
                                    f"{len(s)}-character sentence{seg + 1}")
                spans.append((seg, start, end))
            out.append(NLURecord(where, self.label_index(_get(obj, "label", bool, where), where), text_a=s1,
                                 text_b=s2, spans=tuple(spans), meta={"idx": obj.get("idx"), "word": obj.get("word")}))
        return out


@register_dataset("wsc")
class WSC(NLUTask):
    """Winograd as span classification (the SuperGLUE baseline's framing): does the pronoun (span 2) refer to
    the noun phrase (span 1)? Spans are given as word indices into the text split on spaces."""
    folder = "WSC"
    kind = "span"
    labels = ("false", "true")

    def read(self, path):
        out = []
        for n, obj in _jsonl(path):
            where = f"{path}, line {n}"
            text = _get(obj, "text", str, where)
            words = text.split(" ")
            starts, pos = [], 0
            for w in words:
                starts.append(pos)
                pos += len(w) + 1
            spans = []
            for k in ("1", "2"):
                i = _get(obj, f"target.span{k}_index", int, where)
                span_text = _get(obj, f"target.span{k}_text", str, where)
                n_words = len(span_text.split())
                if not 0 <= i or i + n_words > len(words):
                    raise DataError(f"{where}: field 'target.span{k}_index' = {i} with {n_words} words is past the "
                                    f"text's {len(words)} words")
                end = starts[i + n_words - 1] + len(words[i + n_words - 1])
                spans.append((0, starts[i], end))
            out.append(NLURecord(where, self.label_index(_get(obj, "label", bool, where), where), text_a=text,
                                 spans=tuple(spans), meta={"idx": obj.get("idx")}))
        return out


@register_dataset("multirc")
class MultiRC(NLUTask):
    """One record per answer option: (passage, question + answer) classified true / false. Scored as the
    benchmark scores it: F1a over all answer options, EM over questions (every option of a question right)."""
    folder = "MultiRC"
    labels = ("false", "true")
    metrics = ("f1a", "em", "accuracy")
    main_metric = "f1a"

    def unit(self, record):
        return record.where.split(", passage")[0]  # the passage (its line)

    def read(self, path):
        out = []
        for n, obj in _jsonl(path):
            where = f"{path}, line {n}"
            text = _get(obj, "passage.text", str, where)
            questions = _get(obj, "passage.questions", list, where)
            for qi, q in enumerate(questions):
                qwhere = f"{where}, passage.questions[{qi}]"
                if not isinstance(q, dict):
                    raise DataError(f"{qwhere}: expected an object")
                question = _get(q, "question", str, qwhere)
                for ai, a in enumerate(_get(q, "answers", list, qwhere)):
                    awhere = f"{qwhere}.answers[{ai}]"
                    if not isinstance(a, dict):
                        raise DataError(f"{awhere}: expected an object")
                    label = _get(a, "label", int, awhere)
                    if label not in (0, 1):
                        raise DataError(f"{awhere}: field 'label' is {label!r}, not 0 or 1")
                    out.append(NLURecord(awhere, label, text_a=text,
                                         text_b=f"{question} {_get(a, 'text', str, awhere)}",
                                         group=f"{obj.get('idx')}/{q.get('idx', qi)}",
                                         meta={"idx": obj.get("idx")}))
        return out


# ---------------------------------------------------------------------------------------------- NER
_TAG = re.compile(r"^(O|[BI]-[A-Za-z_]+)$")


def iob2(tags: list[str]) -> list[str]:
    """IOB1 (or IOB2) tags in IOB2: every entity starts with B-. An I-X that does not continue an X entity
    starts one, as conlleval reads it."""
    out, prev = [], "O"
    for t in tags:
        if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


class _NERTask(NLUTask):
    kind = "tagging"
    source = "conll03"
    types: tuple[str, ...] = ()
    metrics = ("f1", "precision", "recall")
    main_metric = "f1"

    @property
    def labels(self) -> tuple[str, ...]:
        return ("O", *(f"{p}-{t}" for t in self.types for p in "BI"))

    def boundary(self, line: str) -> bool:
        """Whether a line ends the current sentence (and is no token)."""
        raise NotImplementedError

    def token(self, path, n: int, line: str, index: int) -> tuple[str, str]:
        """(word, tag) of token line `n`, the sentence's `index`-th; a DataError naming the line otherwise."""
        raise NotImplementedError

    def read(self, path):
        """One record per sentence; blank lines that are not boundaries are skipped."""
        out, words, tags, first = [], [], [], 0
        for n, line in enumerate(read_text(path).split("\n") + [None], 1):
            if line is None or self.boundary(line.rstrip("\r")):
                if words:
                    out.append(self.sentence(path, first, words, tags))
                words, tags = [], []
                continue
            line = line.rstrip("\r")
            if not line.strip():
                continue
            word, tag = self.token(path, n, line, len(words))
            if not words:
                first = n
            words.append(word)
            tags.append(tag)
        if not out:
            raise DataError(f"{path} holds no sentences")
        return out

    def sentence(self, path: Path, line: int, words: list[str], tags: list[str]) -> NLURecord:
        where = f"{path}, line {line}"
        for i, t in enumerate(tags):
            if not _TAG.match(t):
                raise DataError(f"{path}, line {line + i}: NER tag {t!r} is not O, B-<type> or I-<type>")
            if t != "O" and t[2:] not in self.types:
                raise DataError(f"{path}, line {line + i}: entity type {t[2:]!r} is not one of {', '.join(self.types)}")
        return NLURecord(where, words=tuple(words), tags=tuple(self.labels.index(t) for t in iob2(tags)),
                         meta={"gold": tags})


@register_dataset("conll03")
class CoNLL03(_NERTask):
    """CoNLL-2003 English: `word POS chunk NER` per line (space-separated, IOB1), blank lines between sentences,
    -DOCSTART- lines between documents (skipped wherever they stand)."""
    folder = "conll2003"
    types = ("PER", "LOC", "ORG", "MISC")
    default_files = {"train": "eng.train", "dev": "eng.testa", "test": "eng.testb"}

    def boundary(self, line: str) -> bool:
        return not line.strip() or line.startswith("-DOCSTART-")

    def token(self, path, n: int, line: str, index: int) -> tuple[str, str]:
        cols = line.split(" ")
        if len(cols) != 4:
            raise DataError(f"{path}, line {n}: expected 4 space-separated columns (word POS chunk NER), got "
                            f"{len(cols)}: {line!r:.80}")
        return cols[0], cols[3]


@register_dataset("conll04")
class CoNLL04(_NERTask):
    """CoNLL04 (the split of Gupta et al. 2016 in Bekoulis et al.'s format): `#doc <id>` opens a sentence, then
    `index<TAB>word<TAB>BIO tag<TAB>relations<TAB>heads` per token. The entity tags are read; relations are not
    part of this task."""
    folder = "conll04"
    source = "conll04"
    types = ("Peop", "Loc", "Org", "Other")
    default_files = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}

    def boundary(self, line: str) -> bool:
        return line.startswith("#doc")

    def token(self, path, n: int, line: str, index: int) -> tuple[str, str]:
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{path}, line {n}: expected 5 tab-separated columns (index word tag relations heads), "
                            f"got {len(cols)}: {line!r:.80}")
        if not cols[0].isdigit() or int(cols[0]) != index:
            raise DataError(f"{path}, line {n}: token index {cols[0]!r}, expected {index} (a line is missing or out "
                            f"of order)")
        return cols[1], cols[2]


NLU_TASKS = ("cb", "copa", "rte", "wic", "wsc", "boolq", "multirc", "conll03", "conll04")


def build_task(data_cfg) -> NLUTask:
    """The task of a data config (data=cb, ...), reading from data.data_dir."""
    files = dict(data_cfg.files) if data_cfg.get("files") else None
    return DATASETS[data_cfg.name](data_dir=data_cfg.get("data_dir"), files=files,
                                   dev_fraction=data_cfg.get("dev_fraction", 0.1))


def preflight_nlu(data_cfg, splits, root=None) -> NLUTask:
    """Before any model is built: every file the run reads exists and every record parses (the NLU counterpart
    of data/datamodule.preflight_data). Returns the task with its parsed splits cached."""
    task = build_task(data_cfg)
    for split in splits:
        path = task.path(split)
        if not path.is_file():
            where = f" into {root}" if root else ""
            extra = ("; the mirror and the download hold BoolQ's validation file only: give a train file with "
                     "data.files.train=<path relative to data.data_dir>" if task.name == "boolq" and split in
                     ("train", "dev") else "")
            raise DataError(f"data={task.name}: {path} does not exist. Fetch the official files{where} with `python -m "
                            f"prefixtuning.data download {task.source}` (or add data.download=true), or point "
                            f"data.data_dir or $PREFIXTUNING_DATA at a copy (docs/data.md){extra}")
        task.records(split)
    return task
