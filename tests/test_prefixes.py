"""Prefix kinds and initialization."""

import pytest
import torch

from conftest import TEXTS, batch, load_tiny, make_model
from prefixtuning.initialization import initialize_prefix, tile_ids, word_activations
from prefixtuning.prefixes import PREFIXES, build_prefix


def test_registry_has_the_three_kinds():
    assert set(PREFIXES) >= {"static", "reparam", "apt"}
    with pytest.raises(ValueError, match="prefix.kind='nope' is not registered"):
        build_prefix({"kind": "nope", "length": 3}, load_tiny("gpt2").geometry)


@pytest.mark.parametrize("family", ["gpt2", "bart", "llama"])
@pytest.mark.parametrize("kind", ["static", "reparam", "apt"])
def test_key_value_shapes_follow_geometry(family, kind):
    m = make_model(family, kind, length=7, **({"mid_dim": 32} if kind == "reparam" else {}))
    geo = m.backbone.geometry
    kv = m.prefix.key_values()
    assert set(kv) == set(geo.sites)
    for site, (k, v) in kv.items():
        g = geo.sites[site]
        assert k.shape == v.shape == (g.n_layers, 1, g.n_kv_heads, 7, g.head_dim)


def test_reparam_exported_without_mlp_gives_identical_logits():
    m = make_model("gpt2", "reparam", length=5, mid_dim=32)
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        before = m(ids, mask).logits
    static = m.prefix.to_static()
    assert not any("mlp" in n for n, _ in static.named_parameters())
    n_static = sum(p.numel() for p in static.parameters())
    assert n_static < sum(p.numel() for p in m.prefix.parameters())
    m.prefix = static
    with torch.no_grad():
        after = m(ids, mask).logits
    assert torch.equal(before, after)


def test_apt_gates_shape_range_and_input_dependence():
    m = make_model("gpt2", "apt", length=6, gate_init_std=0.5)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        m(ids, mask, source_mask=mask)
    gates = m.prefix.token_gates("decoder")
    L = m.backbone.geometry.sites["decoder"].n_layers
    assert gates.shape == (len(TEXTS), L, 6)
    assert (gates > 0).all() and (gates < 1).all()
    # different inputs -> different gates; the same input in another batch -> the same gates
    assert (gates[0] - gates[1]).abs().max() > 1e-4
    ids1, mask1 = batch(tok, TEXTS[:1])
    with torch.no_grad():
        m(ids1, mask1, source_mask=mask1)
    torch.testing.assert_close(m.prefix.token_gates("decoder")[0], gates[0], rtol=0, atol=1e-6)


def test_apt_gate_scales_the_prefix_exactly():
    """With all token gates forced to 1 and lambda = 1, APT equals the static prefix with the same tensors."""
    m = make_model("gpt2", "apt", length=4)
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        m.prefix.gate_weight["decoder"].zero_()
        m.prefix.gate_bias["decoder"].fill_(50.0)  # sigmoid(50) == 1 in fp32
        m.prefix.layer_scale["decoder"].fill_(1.0)
        gated = m(ids, mask, source_mask=mask).logits
        m.prefix.layer_scale["decoder"].fill_(0.5)
        halved = m(ids, mask, source_mask=mask).logits
    static = build_prefix({"kind": "static", "length": 4}, m.backbone.geometry)
    static.set_key_values({"decoder": (m.prefix.keys["decoder"].data, m.prefix.values["decoder"].data)})
    m_static_prefix, m.prefix = m.prefix, static
    with torch.no_grad():
        ref = m(ids, mask).logits
        static.set_key_values({"decoder": (0.5 * m_static_prefix.keys["decoder"].data,
                                           0.5 * m_static_prefix.values["decoder"].data)})
        ref_half = m(ids, mask).logits
    assert torch.equal(gated, ref)
    torch.testing.assert_close(halved, ref_half, rtol=0, atol=1e-6)


def test_apt_gate_pools_source_tokens_only():
    """Appending target tokens after the source does not change the gates."""
    m = make_model("gpt2", "apt", length=3, gate_init_std=0.5)
    tok = m.backbone.tokenizer
    src, smask = batch(tok, TEXTS[:1])
    tgt = tok(" The Vaults is a pub.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([src, tgt], dim=1)
    mask = torch.ones_like(ids)
    source = torch.cat([smask, torch.zeros_like(tgt)], dim=1)
    with torch.no_grad():
        m(src, smask, source_mask=smask)
        g_src = m.prefix.token_gates()
        m(ids, mask, source_mask=source)
        g_full = m.prefix.token_gates()
    torch.testing.assert_close(g_src, g_full, rtol=0, atol=1e-6)


def test_task_word_init_equals_the_models_own_cache():
    """Independent check: the keys/values of the model run with use_cache on the same (tiled) words."""
    bb = load_tiny("gpt2")
    prefix = build_prefix({"kind": "static", "length": 7}, bb.geometry)
    report = initialize_prefix({"kind": "task_words", "text": "table-to-text:"}, prefix, bb)
    assert report["max_abs_error"] == 0.0
    ids = tile_ids(bb.tokenizer("table-to-text:", add_special_tokens=False)["input_ids"], 7)
    with torch.no_grad():
        out = bb.model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    for layer in range(bb.geometry.sites["decoder"].n_layers):
        torch.testing.assert_close(prefix.keys["decoder"][layer], cache.layers[layer].keys[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(prefix.values["decoder"][layer], cache.layers[layer].values[0], rtol=0, atol=1e-6)


def test_word_inits_differ_and_reparam_fits_them():
    bb = load_tiny("gpt2")
    task = word_activations(bb, "table-to-text:", 5)["decoder"][0]
    other = word_activations(bb, "elephant", 5)["decoder"][0]
    assert (task - other).abs().max() > 1e-2
    torch.manual_seed(0)
    prefix = build_prefix({"kind": "reparam", "length": 5, "mid_dim": 64}, bb.geometry)
    report = initialize_prefix({"kind": "irrelevant_words", "text": "elephant"}, prefix, bb)
    target = word_activations(bb, "elephant", 5)["decoder"]
    scale = target[0].abs().max().item()
    assert report["max_abs_error"] < 0.05 * scale


def test_bart_word_init_covers_all_three_sites():
    bb = load_tiny("bart")
    acts = word_activations(bb, "summarize", 4)
    assert set(acts) == {"encoder", "decoder", "cross"}
    prefix = build_prefix({"kind": "static", "length": 4}, bb.geometry)
    initialize_prefix({"kind": "task_words", "text": "summarize"}, prefix, bb)
    for site in acts:
        assert torch.equal(prefix.keys[site].data, acts[site][0])


def test_apt_gates_after_beam_search_are_per_example_and_equal_the_prompt_forward():
    m = make_model("gpt2", "apt", length=4, gate_init_std=0.5)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS, side="left")
    m.generate(ids, mask, num_beams=3, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    after_beam = m.prefix.token_gates()
    with torch.no_grad():
        m(ids, mask, source_mask=mask)
    assert after_beam.shape == (3, 2, 4)
    torch.testing.assert_close(after_beam, m.prefix.token_gates(), rtol=0, atol=1e-6)
