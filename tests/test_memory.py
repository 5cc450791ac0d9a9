"""PrefixMemory-Tuning (prefix=memory) against an explicit computation of its equation, o_i = Attention(q_i, K, V) +
phi(q_i)^T M, written out by hand on a grouped-query, rotary backbone (tiny Llama: 4 query heads, 2 kv heads) and on
GPT-2; and through what the other prefix kinds go through: cached decoding, export, the prefix bank, PEFT's
refusal, config checks, train.py with resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import TEXTS, batch, compose_cfg, load_tiny, make_model
from prefixtuning.artifacts import ExportError
from prefixtuning.export import export_prefix
from prefixtuning.loading import load_prefix
from prefixtuning.model import PrefixTuningModel
from prefixtuning.peft_interop import export_peft
from prefixtuning.prefixes import build_prefix
from prefixtuning.serving import PrefixBank
from prefixtuning.settings import ConfigError

PHI = {"elu1": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x, "elu": F.elu}


def memory_model(family: str, feature_map: str = "elu1", std: float = 0.3, seed: int = 0):
    m = make_model(family, "memory", length=0, seed=seed, feature_map=feature_map)
    torch.manual_seed(seed + 1)
    m.prefix.reset_random(std)
    return m


def explicit_llama_logits(model, ids, mask, memory, phi):
    """Llama written out: RMSNorm, q/k/v, rotary, causal softmax over the grouped keys, plus phi(q) M of the query
    head's kv group, o_proj, MLP. memory (L, n_kv, hd, hd)."""
    inner = model.model
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, pos)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & mask.bool()[:, None, :]  # (B, T, T)
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        hd = a.head_dim
        q = a.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = a.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = a.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        H, n_kv = q.shape[1], k.shape[1]
        group = torch.arange(H) // (H // n_kv)  # the kv head each query head reads
        k, v = k[:, group], v[:, group]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = scores.softmax(-1) @ v  # (B, H, T, hd)
        out = out + phi(q) @ memory[i][group]  # (B, H, T, hd) @ (H, hd, hd)
        h = h + a.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def explicit_gpt2_logits(model, ids, mask, memory, phi):
    """GPT-2 written out: causal softmax attention per head plus phi(q) M of that head (n_kv = H)."""
    tr = model.transformer
    B, T = ids.shape
    h = tr.wte(ids) + tr.wpe((mask.cumsum(-1) - 1).clamp(min=0))
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    for i, block in enumerate(tr.h):
        a = block.attn
        q, k, v = (block.ln_1(h) @ a.c_attn.weight + a.c_attn.bias).split(a.embed_dim, dim=2)
        q, k, v = (t.view(B, T, a.num_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)).masked_fill(~allowed[:, None], float("-inf"))
        out = scores.softmax(-1) @ v + phi(q) @ memory[i]  # GPT-2: one memory per head (n_kv = H)
        h = h + (out.transpose(1, 2).reshape(B, T, a.embed_dim) @ a.c_proj.weight + a.c_proj.bias)
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(tr.ln_f(h))


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_equals_the_explicit_equation(family, texts, feature_map):
    m = memory_model(family, feature_map)
    ids, mask = batch(m.backbone.tokenizer, texts)
    M = m.prefix.memory["decoder"].detach()
    explicit = explicit_llama_logits if family == "llama" else explicit_gpt2_logits
    with torch.no_grad():
        ours = m(ids, mask).logits
        ref = explicit(m.backbone.model, ids, mask, M, PHI[feature_map])
        m.backbone.injector.deactivate()
        plain = m.backbone.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-5
    assert (plain - ours)[real].abs().max().item() > 1e-2  # the memory matters


def test_zero_memory_is_the_frozen_backbone_exactly_and_still_gets_a_gradient():
    m = make_model("llama", "memory", length=0)  # M = 0, the default
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    out = m(ids, mask).logits
    m.backbone.injector.deactivate()
    with torch.no_grad():
        plain = m.backbone.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.detach()[mask.bool()], plain[mask.bool()])
    out[mask.bool()].logsumexp(-1).sum().backward()
    g = m.prefix.memory["decoder"].grad
    assert g is not None and (g != 0).all(dim=(2, 3)).all()  # every layer and kv head gets a gradient at M = 0
    assert all(not p.requires_grad for p in m.backbone.model.parameters())
    n_layers, n_kv, hd = g.shape[0], g.shape[1], g.shape[2]
    assert m.prefix.memory["decoder"].numel() == n_layers * n_kv * hd * hd


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_steps_equal_the_full_forward(family):
    """The term depends on the current query only: a prefill plus steps through the cache give the logits of one
    forward over the whole sequence."""
    m = memory_model(family)
    ids, mask = batch(m.backbone.tokenizer, TEXTS[:1])
    with torch.no_grad():
        full = m(ids, mask).logits
        m.method.activate(m.backbone, mask)
        cache = DynamicCache(config=m.backbone.model.config)
        n = ids.shape[1] - 3
        steps = [m.backbone.model(input_ids=ids[:, :n], past_key_values=cache, use_cache=True).logits]
        for t in range(n, ids.shape[1]):
            steps.append(m.backbone.model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_export_reloads_exactly_with_its_feature_map_and_peft_refuses_it(tmp_path):
    m = memory_model("llama", "relu")
    export_prefix(m.prefix, m.backbone, tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "prefix.json").read_text())
    assert meta["kind"] == "memory" and meta["length"] == 0 and meta["settings"] == {"feature_map": "relu"}
    prefix, _ = load_prefix(tmp_path / "e", m.backbone)
    assert prefix.feature_map == "relu" and torch.equal(prefix.memory["decoder"], m.prefix.memory["decoder"])
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        a = m(ids, mask).logits
        b = PrefixTuningModel(m.backbone, prefix).eval()(ids, mask).logits
    assert torch.equal(a, b)
    with pytest.raises(ExportError, match="outside the softmax"):
        export_peft(m.prefix, m.backbone, tmp_path / "peft")


@pytest.mark.parametrize("beams", [1, 3])
def test_bank_mixes_memory_static_and_plain_rows_each_as_alone(beams):
    bb = load_tiny("llama")
    torch.manual_seed(3)
    mem = build_prefix({"kind": "memory"}, bb.geometry)
    mem.reset_random(0.3)
    static = build_prefix({"kind": "static", "length": 4}, bb.geometry)
    static.reset_random(0.3)
    bank = PrefixBank(bb)
    bank.add("mem", mem)
    bank.add("p4", static)
    texts = [t.strip() for t in TEXTS] + ["name : Cocum | food : Chinese"]
    ids = ["mem", "p4", None, "mem"]
    kw = dict(max_new_tokens=8, min_new_tokens=3, num_beams=beams, do_sample=False)
    mixed = bank.generate(texts, ids, **kw)
    alone = []
    for text, pid in zip(texts, ids):
        alone += bank.generate([text], [pid], **kw)
    assert mixed == alone
    logits, lmask = bank.logits(texts, ids)
    for row, (text, pid) in enumerate(zip(texts, ids)):
        single, m1 = bank.logits([text], [pid])
        n = int(m1.sum())
        torch.testing.assert_close(logits[row, -n:], single[0, -n:], rtol=0, atol=1e-5)
    single_mem, _ = bank.logits([texts[0]], ["mem"])
    plain, _ = bank.logits([texts[0]], [None])
    assert (single_mem - plain).abs().max() > 1e-2
    relu = build_prefix({"kind": "memory", "feature_map": "relu"}, bb.geometry)
    bank.add("relu", relu)
    with pytest.raises(ValueError, match="different feature maps"):
        bank.logits(texts[:2], ["mem", "relu"])


def test_settings_that_would_not_take_effect_are_refused_before_any_work():
    from prefixtuning.config_check import check_train_config

    geo = load_tiny("gpt2").geometry
    with pytest.raises(ValueError, match="does not apply to the memory kind"):
        build_prefix({"kind": "memory", "length": 5}, geo)
    with pytest.raises(ValueError, match="feature_map='softmax' is not one of"):
        build_prefix({"kind": "memory", "feature_map": "softmax"}, geo)
    base = ["prefix=memory"]
    check_train_config(compose_cfg(base + ["init=random"], "/tmp/unused"))
    with pytest.raises(ConfigError, match="init=task_words .* prefix=memory has no positions"):
        check_train_config(compose_cfg(base + ["init=task_words"], "/tmp/unused"))
    with pytest.raises(ConfigError, match="prefix.length"):
        check_train_config(compose_cfg(base + ["init=random", "+prefix.length=5"], "/tmp/unused"))


def test_train_py_trains_resumes_exactly_evaluates_and_exports(tmp_path):
    """prefix=memory through what the user types (row=memory): trains from M = 0, resumes to the same tensors,
    and evaluate.py gives the same numbers on the checkpoint and on its export."""
    from prefixtuning.evaluation import evaluate
    from prefixtuning.export import export_checkpoint
    from prefixtuning.training import train
    from test_methods import SMALL
    from test_training import interrupted_run

    common = SMALL + ["row=memory", "backbone=tiny-llama", "optim.epochs=2", "optim.lr=1.0e-2"]
    full = train(compose_cfg(common, tmp_path / "full"))
    interrupted_run(compose_cfg(common, tmp_path / "part"))
    resumed = train(compose_cfg(common + ["ckpt_path=last"], tmp_path / "part"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(a["state_dict"]) == {"model.method.prefix.memory.decoder"}
    assert torch.equal(a["state_dict"]["model.method.prefix.memory.decoder"],
                       b["state_dict"]["model.method.prefix.memory.decoder"])
    assert a["state_dict"]["model.method.prefix.memory.decoder"].abs().max() > 0  # trained away from M = 0
    assert resumed["val/loss"] == full["val/loss"]
    out = export_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert json.loads((out.parent / "prefix.json").read_text())["kind"] == "memory"
    ev = ["split=dev", "max_inputs=2", "progress=false", "decoding=greedy", "decoding.max_new_tokens=5"]
    e1 = evaluate(compose_cfg([f"ckpt={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}", *ev], tmp_path / "ev1",
                              config_name="eval"))
    e2 = evaluate(compose_cfg([f"ckpt={tmp_path / 'export'}", *ev], tmp_path / "ev2", config_name="eval"))
    assert e1["reference_loss"] == e2["reference_loss"]
    assert (tmp_path / "ev1" / "predictions_dev.txt").read_text() == (tmp_path / "ev2" / "predictions_dev.txt").read_text()
