"""WebNLG, DART, XSUM loaders on the real files; low-resource and category splits; bad input."""

import json
from pathlib import Path

import pytest

from conftest import SHARED, load_tiny
from prefixtuning.data import DataError
from prefixtuning.data.base import Example
from prefixtuning.data.datamodule import PrefixDataModule
from prefixtuning.data.subsets import lowres_subsample
from prefixtuning.data.triples import (WEBNLG_SEEN, WEBNLG_UNSEEN, DARTData, WebNLGData, read_dart_json,
                                       read_triples_xml, read_webnlg_json)
from prefixtuning.data.xsum import XSumData, url_category
from prefixtuning.metrics.files import read_lines

FX = Path(__file__).parent / "fixtures" / "metric_parity"
needs = {name: pytest.mark.skipif(not (SHARED / name).exists(), reason=f"../shared/data/{name} not present")
         for name in ("webnlg", "dart", "xsum")}


@needs["webnlg"]
def test_webnlg_counts_and_seen_unseen():
    data = WebNLGData(SHARED / "webnlg")
    test = data.eval_groups("test")
    assert len(test) == 1862 and sum(len(g.references) for g in test) == 4928
    cats = [g.meta["category"] for g in test]
    assert all(c in WEBNLG_SEEN for c in cats[:971]) and all(c in WEBNLG_UNSEEN for c in cats[971:])
    train, dev = data.eval_groups("train"), data.eval_groups("dev")
    assert (len(train), sum(len(g.references) for g in train)) == (6940, 18102)
    assert (len(dev), sum(len(g.references) for g in dev)) == (872, 2268)
    assert test[0].source == "Abilene_Regional_Airport : cityServed : Abilene,_Texas"


@needs["webnlg"]
def test_webnlg_json_and_xml_are_the_same_records():
    xml = WebNLGData(SHARED / "webnlg").eval_groups("dev")
    js = read_webnlg_json(SHARED / "webnlg" / "prefixtuning_json" / "dev.json")
    assert [(g.source, g.references, g.meta["category"]) for g in xml] == [
        (g.source, g.references, g.meta["category"]) for g in js]


@needs["webnlg"]
def test_webnlg_reference_files_equal_the_official_ones():
    """References written from the XML are byte-for-byte the challenge's gold-all-cat-reference*.lex."""
    groups = WebNLGData(SHARED / "webnlg").eval_groups("test")
    ours = WebNLGData.reference_files(groups, n_refs=3)
    for k in range(3):
        assert ours[k] == read_lines(FX / f"gold-all-cat-reference{k}.lex"), k


@needs["dart"]
def test_dart_counts_and_official_references():
    data = DARTData(SHARED / "dart" / "v1.1.1")
    dev = data.eval_groups("dev")
    assert len(dev) == 2768 and sum(len(g.references) for g in dev) == 6980
    test = data.eval_groups("test")
    assert len(test) == 5097 and sum(len(g.references) for g in test) == 12552
    xml_dev = read_triples_xml(SHARED / "dart" / "v1.1.1" / "dart-v1.1.1-full-dev.xml")
    assert [(g.source, g.references) for g in xml_dev] == [(g.source, g.references) for g in dev]
    ours = DARTData.reference_files(test, n_refs=3)
    for k in range(3):  # the reference files DART's official evaluation reads, line for line
        official = read_lines(SHARED / "dart" / "v1.1.1" / "eval_references" / f"all-delex-reference{k}.lex")
        assert ours[k] == official, k


@needs["xsum"]
def test_xsum_official_split_and_sample_categories():
    split = XSumData(SHARED / "xsum", files={"documents": "sample_test_articles_pr31.jsonl"}).split_ids()
    assert (len(split["train"]), len(split["dev"]), len(split["test"])) == (204045, 11332, 11334)
    data = XSumData(SHARED / "xsum", files={"documents": "sample_test_articles_pr31.jsonl"})
    with pytest.raises(DataError, match=r"204045 of the 204045 train ids have no document .*first: id"):
        data.records("train")
    docs = data.documents()
    assert len(docs) == 321
    for d in docs.values():
        assert url_category(d["url"]) == (d["url_top"], d["url_section"]) or d["url_top"] not in ("news", "sport")


@pytest.mark.parametrize("cls", [WebNLGData, DARTData, XSumData])
def test_shipped_samples_load_every_split(cls):
    d = cls()
    for split in ("train", "dev", "test"):
        groups = d.eval_groups(split)
        assert groups and len(d.pairs(split)) == sum(len(g.references) for g in groups)
        assert all(g.source and g.references for g in groups)


def test_lowres_is_deterministic_disjoint_and_exact():
    pairs = [Example(f"in{i // 3}", f"ref{i}") for i in range(6000)]
    for size in (50, 100, 200, 500):
        a = lowres_subsample(pairs, size, 3)
        b = lowres_subsample(list(pairs), size, 3)
        assert a == b
        train, dev = a
        assert len(train) == size and len(dev) == round(0.3 * size)
        assert not {e.source for e in train} & {e.source for e in dev}
    assert lowres_subsample(pairs, 50, 0) != lowres_subsample(pairs, 50, 1)


def test_lowres_through_the_datamodule_writes_its_examples(tmp_path):
    from omegaconf import OmegaConf

    tok = load_tiny("gpt2").tokenizer
    cfg = OmegaConf.create({"name": "e2e", "data_dir": None, "files": None, "batch_size": 4})
    lowres = OmegaConf.create({"enabled": True, "size": 50, "sample": 2, "dev_fraction": 0.3})
    dm = PrefixDataModule(cfg, tok, False, lowres=lowres, output_dir=tmp_path)
    assert len(dm.features("train")) == 50 and len(dm.features("dev")) == 15
    written = [json.loads(l) for l in (tmp_path / "lowres" / "train.jsonl").read_text().splitlines()]
    assert [w["target"] for w in written] == [e.target for e in dm.pairs("train")]
    assert len(dm.eval_groups("test")) == 20  # the test split is untouched


def test_category_split_filters_and_fails_without_categories(tmp_path):
    from omegaconf import OmegaConf

    tok = load_tiny("bart").tokenizer
    cfg = OmegaConf.create({"name": "xsum", "data_dir": None, "files": None, "batch_size": 4})
    split = OmegaConf.create({"name": "xsum_within_news", "field": "news_group", "train": ["world", "uk", "business"],
                              "test": ["health", "technology"]})
    dm = PrefixDataModule(cfg, tok, True, split=split)
    assert {e.meta["url_section"].split("-")[0] for e in dm.pairs("train")} <= {"world", "uk", "business"}
    assert {g.meta["url_section"].split("-")[0] for g in dm.eval_groups("test")} == {"health", "technology"}
    # the same corpus without URLs: a clear error
    src = Path(XSumData().data_dir)
    lines = [json.loads(l) for l in (src / "articles.jsonl").read_text().splitlines()]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({k: r[k] for k in ("id", "document", "summary")})
                                                  for r in lines))
    (tmp_path / "split.json").write_text((src / "sample_split.json").read_text())
    cfg2 = OmegaConf.create({"name": "xsum", "data_dir": str(tmp_path), "batch_size": 4,
                             "files": {"documents": "docs.jsonl", "split_file": "split.json"}})
    dm2 = PrefixDataModule(cfg2, tok, True, split=split)
    with pytest.raises(DataError, match="has no 'news_group' information.*urls_file"):
        dm2.pairs("train")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_bad_triple_files_name_the_file_and_record(tmp_path):
    p = _write(tmp_path, "bad.xml", "<benchmark><entries><entry eid='Id7'><modifiedtripleset>"
                                    "<mtriple>A | b</mtriple></modifiedtripleset></entry></entries>")
    with pytest.raises(DataError, match=r"bad.xml: malformed XML"):
        read_triples_xml(p)
    p = _write(tmp_path, "two.xml", "<benchmark><entries><entry eid='Id7'><modifiedtripleset>"
                                    "<mtriple>A | b</mtriple></modifiedtripleset></entry></entries></benchmark>")
    with pytest.raises(DataError, match=r"two.xml, entry Id7: triple 'A \| b' does not have three parts"):
        read_triples_xml(p)
    p = _write(tmp_path, "bad.json", '[{"tripleset": [["a", "b"]], "annotations": [{"text": "x"}]}]')
    with pytest.raises(DataError, match=r"bad.json, record 1: triple \['a', 'b'\] does not have three parts"):
        read_dart_json(p)
    # records without references are rejected by name, never silently dropped from training
    p = _write(tmp_path, "noref.json", '[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": "x"}]}, '
                                       '{"tripleset": [["a", "b", "c"]], "annotations": []}]')
    with pytest.raises(DataError, match=r"noref.json, record 2, field 'annotations': no annotation"):
        read_dart_json(p)
    p = _write(tmp_path, "int.json", '[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": 7}]}]')
    with pytest.raises(DataError, match=r"int.json, record 1, field 'annotations'\[0\]: expected an object with a "
                                        r"string 'text'"):
        read_dart_json(p)
    p = _write(tmp_path, "nolex.xml", "<benchmark><entries><entry eid='Id3'><modifiedtripleset><mtriple>A | b | c"
                                      "</mtriple></modifiedtripleset></entry></entries></benchmark>")
    with pytest.raises(DataError, match=r"nolex.xml, entry Id3: no <lex> reference"):
        read_triples_xml(p)
    p = _write(tmp_path, "nolex.json", json.dumps({"entries": [{"1": {"category": "Airport", "lexicalisations": [],
                                                                     "modifiedtripleset": [{"subject": "A",
                                                                     "property": "b", "object": "c"}]}}]}))
    with pytest.raises(DataError, match=r"nolex.json, record 1 \(id 1\), field 'lexicalisations': no reference"):
        read_webnlg_json(p)
    p = _write(tmp_path, "trunc.json", '{"entries": [')
    with pytest.raises(DataError, match=r"trunc.json: malformed JSON"):
        read_webnlg_json(p)


def test_unknown_category_and_missing_document(tmp_path):
    groups = WebNLGData().eval_groups("test")
    bad = [type(g)(g.source, g.references, {**g.meta, "category": "Volcano"}) for g in groups[:2]]
    with pytest.raises(DataError, match=r"categories \['Volcano'\]"):
        WebNLGData().score(bad, ["x", "y"])
    _write(tmp_path, "docs.jsonl", json.dumps({"id": "1", "document": "d", "summary": "s"}) + "\n")
    _write(tmp_path, "split.json", json.dumps({"train": ["1", "2"], "validation": [], "test": []}))
    data = XSumData(tmp_path, files={"documents": "docs.jsonl", "split_file": "split.json"})
    with pytest.raises(DataError, match=r"split.json: 1 of the 2 train ids have no document .*first: id 2"):
        data.records("train")
    _write(tmp_path, "bad.jsonl", '{"id": "1", "document": "d"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, field 'summary': missing, empty or not a string"):
        XSumData(tmp_path, files={"documents": "bad.jsonl", "split_file": "split.json"}).documents()
