"""E2E loading, linearization, grouping and bad input."""

import collections

import pytest

from conftest import SHARED, load_tiny
from prefixtuning.data import DataError
from prefixtuning.data.e2e import E2EData, linearize_mr, read_e2e_csv, sample_dir
from prefixtuning.data.features import IGNORE, Collator, Featurizer

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _nospace(s):
    return s.replace(" ", "")


def test_linearization_examples():
    mr = ("name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], "
          "near[Café Adriatic], familyFriendly[yes]")
    assert linearize_mr(mr) == ("name : The Vaults | Type : pub | price : more than £30 | customer rating : "
                                "5 out of 5 | near : Café Adriatic | family friendly : yes")


def test_linearization_matches_the_papers_files_on_the_sample():
    """The paper's src1_valid.txt has the same MRs (per row, with multiplicity) up to its word tokenization,
    which puts spaces around punctuation (`£ 20 - 25`)."""
    ours = collections.Counter(_nospace(ex.source) for ex in E2EData().pairs("dev"))
    paper = collections.Counter(_nospace(l) for l in (FIXTURES / "e2e_src1_valid_sample_mrs.txt")
                                .read_text(encoding="utf-8").splitlines())
    assert ours == paper and sum(ours.values()) == 210


@pytest.mark.skipif(not (SHARED / "e2e").exists(), reason="../shared/data/e2e not present")
@pytest.mark.parametrize("split,paper_file", [("dev", "src1_valid.txt"), ("test", "src1_test.txt")])
def test_linearization_matches_the_papers_files_in_full(split, paper_file):
    data = E2EData(SHARED / "e2e")
    ours = collections.Counter(_nospace(ex.source) for ex in data.pairs(split))
    lines = (SHARED / "e2e" / "prefixtuning_format" / paper_file).read_text(encoding="utf-8").splitlines()
    assert ours == collections.Counter(_nospace(l.split("||")[0]) for l in lines)


@pytest.mark.skipif(not (SHARED / "e2e").exists(), reason="../shared/data/e2e not present")
def test_official_counts():
    data = E2EData(SHARED / "e2e")
    test = data.eval_groups("test")
    assert len(test) == 630 and sum(len(g.references) for g in test) == 4693
    dev = data.eval_groups("dev")
    assert len(dev) == 547 and sum(len(g.references) for g in dev) == 4672
    assert len(data.pairs("train")) == 42061


def test_sample_grouping_keeps_every_reference_in_order():
    rows = read_e2e_csv(sample_dir() / "test.csv")
    groups = E2EData().eval_groups("test")
    assert len(groups) == 20 and sum(len(g.references) for g in groups) == len(rows) == 142
    first = groups[0]
    assert list(first.references) == [r.ref.strip() for r in rows if linearize_mr(r.mr) == first.source]


def _write(tmp_path, text):
    p = tmp_path / "bad.csv"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("body,line,what", [
    ('mr,ref\n"name[A], eatType[pub]",A pub.\n"name[B] eatType[pub]",B.\n', 3, "malformed MR"),
    ('mr,ref\n"name[A], colour[red]",A.\n', 2, "unknown attribute 'colour'"),
    ('mr,ref\n"name[A]",A.\n"name[B]"\n', 3, "1 fields, expected 2"),
    ('mr,ref\n"name[A]",A.\n"name[B]",  \n', 3, "empty reference"),
    ('mr,ref\n"name[A]",A.\n"name[B]",B.\n"name[C]",C,extra\n', 4, "3 fields"),
    ('mr,ref\n"name[A]",A.\n"name[B]","nul\x00here"\n', 3, "field ref: a NUL byte"),
    ('mr,ref\n"name[A]",A.\n"name[B]","multi\nline"\n"name[C]",C,extra\n', 5, "3 fields"),  # lines counted
])
def test_malformed_rows_name_file_and_line(tmp_path, body, line, what):
    p = _write(tmp_path, body)
    with pytest.raises(DataError) as err:
        read_e2e_csv(p)
    assert f"{p}, line {line}" in str(err.value) and what in str(err.value)


def test_a_quoted_line_break_is_joined_and_reported_never_shifting_the_groups(tmp_path, capsys):
    """The official trainset.csv has a reference with a quoted line break (line 15766). Every reference and
    prediction file is one line per text, so the break is joined with a space, and the reader says so."""
    p = _write(tmp_path, 'mr,ref\n"name[A]",A.\n"name[B]","two\r\n  lines"\n"name[B]",B.\n')
    rows = read_e2e_csv(p)
    assert [r.ref for r in rows] == ["A.", "two lines", "B."] and [r.line for r in rows] == [2, 3, 5]
    assert f"{p}: 1 value(s) held a line break, joined with a space (line 3, field ref)" in capsys.readouterr().out


def test_bad_header_and_missing_split(tmp_path):
    p = _write(tmp_path, "meaning,text\nx,y\n")
    with pytest.raises(DataError, match="line 1: header"):
        read_e2e_csv(p)
    with pytest.raises(DataError, match="E2E has no split 'valid'"):
        E2EData().pairs("valid")
    with pytest.raises(DataError, match="does not exist"):
        E2EData(tmp_path / "nowhere").pairs("train")


def test_features_mask_the_source_and_end_with_eos():
    tok = load_tiny("gpt2").tokenizer
    f = Featurizer(tok, is_encoder_decoder=False)
    ex = E2EData().pairs("train")[0]
    feats = f.train_features(ex)
    n_src = feats["source_len"]
    assert feats["input_ids"][n_src - 1] == tok.bos_token_id  # separator closes the source
    assert feats["labels"][:n_src] == [IGNORE] * n_src
    assert feats["labels"][n_src:] == feats["input_ids"][n_src:]
    assert feats["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(feats["input_ids"][n_src:-1]).strip() == ex.target
    b = Collator(tok.pad_token_id, False)([feats, f.train_features(E2EData().pairs("train")[1])])
    assert b["source_mask"].sum(1).tolist()[0] == n_src
    assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE)).all()
