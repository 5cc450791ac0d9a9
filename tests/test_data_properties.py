"""Property test over every dataset reader: a real shipped file with one record mutated (bytes deleted,
inserted, replaced, duplicated, truncated; non-UTF-8 bytes and the formats' own delimiters included) either
loads, or raises the project's DataError naming the file and a location. Never another exception.

Plus the observed failures of the readers, each as an example test."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixtuning.data.base import DataError
from omegaconf import OmegaConf

from prefixtuning.data.datamodule import build_dataset as _build


def build_dataset(cfg: dict):
    return _build(OmegaConf.create(cfg))

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "prefixtuning" / "data" / "samples"
EXAMPLES = 300  # per reader file: 1,500 mutated inputs in all (5 reader files)
LOCATION = re.compile(r"line \d+|record \d+|entry|field|column \d+|id \S+|has no|is empty|no <|empty")

# Bytes a mutation may insert: the formats' own delimiters, brackets, quotes, and bytes that are not UTF-8.
INSERTS = st.sampled_from([b",", b"\"", b"[", b"]", b"{", b"}", b"<", b">", b"</entry>", b"|", b"\n", b"\r\n",
                           b"\xff", b"\xc3", b"\x80\x80", b"\x00", b"name[", b"]]", b"null", b"0", b"\"\"",
                           b"<mtriple>a | b</mtriple>", b"caf\xc3\xa9"])


@st.composite
def mutation(draw, size: int):
    kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "truncate"]))
    a = draw(st.integers(0, size - 1))
    b = draw(st.integers(a, min(size, a + 64)))
    return kind, a, b, draw(INSERTS)


def mutate(raw: bytes, m) -> bytes:
    kind, a, b, ins = m
    if kind == "delete":
        return raw[:a] + raw[b:]
    if kind == "insert":
        return raw[:a] + ins + raw[a:]
    if kind == "replace":
        return raw[:a] + ins + raw[b:]
    if kind == "duplicate":
        return raw[:b] + raw[a:b] + raw[b:]
    return raw[:a]


def _slice(path: Path, keep: int) -> bytes:
    """The first `keep` records of a real sample file (whole records, so the unmutated file is valid)."""
    raw = path.read_bytes()
    if path.suffix in (".csv", ".jsonl"):
        return b"".join(raw.splitlines(keepends=True)[:keep])
    if path.suffix == ".json":
        data = json.loads(raw)
        if isinstance(data, list):
            return json.dumps(data[:keep], ensure_ascii=False).encode()
        return raw
    entries = re.findall(rb"<entry .*?</entry>", raw, flags=re.S)[:keep]
    return b"<benchmark><entries>" + b"".join(entries) + b"</entries></benchmark>"


def _load(tmp: Path, name: str, split_file: str, raw: bytes):
    """Write `raw` as one split of a dataset folder and load that split the way training does."""
    if name == "xsum":
        (tmp / "articles.jsonl").write_bytes(raw)
        ids = [json.loads(l)["id"] for l in _slice(SAMPLES / "xsum" / "articles.jsonl", 6).splitlines()]
        (tmp / "split.json").write_text(json.dumps({"train": ids[:2], "validation": ids[2:4], "test": ids[4:]}))
        ds = build_dataset({"name": "xsum", "data_dir": str(tmp),
                            "files": {"documents": "articles.jsonl", "split_file": "split.json"}})
        return ds.pairs("train"), ds.eval_groups("test")
    (tmp / split_file).write_bytes(raw)
    ds = build_dataset({"name": name, "data_dir": str(tmp), "files": {"train": split_file, "dev": split_file,
                                                                     "test": split_file}})
    return ds.pairs("train"), ds.eval_groups("test")


CASES = [("e2e", SAMPLES / "e2e" / "train.csv", "train.csv", 8),
         ("webnlg", SAMPLES / "webnlg" / "train.xml", "train.xml", 4),
         ("dart", SAMPLES / "dart" / "train.json", "train.json", 4),
         ("dart", SAMPLES / "dart" / "test.xml", "test.xml", 4),
         ("xsum", SAMPLES / "xsum" / "articles.jsonl", None, 6)]


@pytest.mark.parametrize("name,path,split_file,keep", CASES, ids=[f"{c[0]}-{c[1].suffix[1:]}" for c in CASES])
def test_mutated_real_records_load_or_raise_a_located_data_error(tmp_path_factory, name, path, split_file, keep):
    base = _slice(path, keep)
    tmp0 = tmp_path_factory.mktemp(name)
    _load(tmp0, name, split_file, base)  # the unmutated slice is valid

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(m=mutation(len(base)))
    def check(m):
        tmp = tmp_path_factory.mktemp("m")
        try:
            _load(tmp, name, split_file, mutate(base, m))
        except DataError as err:
            msg = str(err)
            assert str(tmp) in msg, f"the error names no file: {msg}"
            assert LOCATION.search(msg), f"the error names no location: {msg}"

    check()


# ---------------------------------------------------------------- the observed failures, one test each

def _e2e(tmp: Path, text: bytes):
    (tmp / "train.csv").write_bytes(text)
    return build_dataset({"name": "e2e", "data_dir": str(tmp), "files": {"train": "train.csv"}}).pairs("train")


def test_e2e_non_utf8_bytes_name_file_line_and_column(tmp_path):
    with pytest.raises(DataError, match=r"train.csv, line 3, column 10: bytes b'\\xff' are not UTF-8"):
        _e2e(tmp_path, b'mr,ref\n"name[A]","A is."\n"name[Caf\xff]","B."\n')


def test_dart_non_utf8_bytes_name_file_and_line(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[{"tripleset": [["a", "b", "c"]],\n "annotations": [{"text": "x\xfe"}]}]')
    ds = build_dataset({"name": "dart", "data_dir": str(tmp_path), "files": {"train": "d.json"}})
    with pytest.raises(DataError, match=r"d.json, line 2, column \d+: bytes b'\\xfe' are not UTF-8"):
        ds.pairs("train")


def test_e2e_slot_left_open_is_rejected_with_its_field(tmp_path):
    with pytest.raises(DataError, match=r"line 2, field mr: malformed MR"):
        _e2e(tmp_path, b'mr,ref\n"name[The Eagle, eatType[pub]","The Eagle is a pub."\n')


def test_header_only_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"train.csv: split 'train' has no examples"):
        _e2e(tmp_path, b"mr,ref\n")
