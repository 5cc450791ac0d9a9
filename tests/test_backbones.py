"""Encoder-decoder (BART), grouped-query attention (Llama), gradient checkpointing, generation."""

import pytest
import torch

from conftest import TEXTS, batch, make_model
from prefixtuning.prefixes import build_prefix

KINDS = [("static", {}), ("reparam", {"mid_dim": 32}), ("apt", {"gate_init_std": 0.5})]


def _bart_batch(tok):
    enc = tok([t.strip() for t in TEXTS], return_tensors="pt", padding=True)
    labels = tok(text_target=["The Vaults is a pub.", "Blue Spice is central.", "A coffee shop."],
                 return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return enc["input_ids"], enc["attention_mask"], labels


SITE_MODULES = {"encoder": ("encoder", "self_attn"), "decoder": ("decoder", "self_attn"),
                "cross": ("decoder", "encoder_attn")}


def _site_outputs(model, site, run):
    """The attention output of every layer of `site` during `run()` (forward hooks on the attention modules)."""
    stack, attr = SITE_MODULES[site]
    layers = getattr(model.backbone.model.model, stack).layers
    outs, handles = [], []
    for layer in layers:
        handles.append(getattr(layer, attr).register_forward_hook(lambda mod, a, out: outs.append(out[0].clone())))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return outs, result


def _site_keys(model, site, run, length):
    """Each layer's own keys at `site` for the first `length` positions of row 0 during `run()`, as
    (n_layers, n_heads, length, head_dim): prefix keys that score exactly like real tokens."""
    stack, attr = SITE_MODULES[site]
    layers = getattr(model.backbone.model.model, stack).layers
    g = model.backbone.geometry.sites[site]
    keys, handles = [], []
    for layer in layers:
        handles.append(getattr(layer, attr).k_proj.register_forward_hook(
            lambda mod, a, out: keys.append(out[0, :length].reshape(length, g.n_kv_heads, g.head_dim).transpose(0, 1))))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return torch.stack(keys[: g.n_layers])


def test_bart_each_site_acts_where_it_is_and_reaches_the_logits():
    """Each site's prefix changes that site's attention output at every layer, and its effect on the logits is
    exactly the effect it has on what flows on. The prefix keys are the layer's own keys of real tokens, so the
    prefix takes a share of the attention by construction; how much a tiny BART attends to random keys, or how
    much its decoder reads the encoder, depends on the machine that pretrained it and is not what is tested."""
    m = make_model("bart", length=4)
    ids, mask, labels = _bart_batch(m.backbone.tokenizer)
    bart = m.backbone.model
    torch.manual_seed(1)
    with torch.no_grad():
        m.backbone.injector.deactivate()
        plain_run = lambda: bart(input_ids=ids, attention_mask=mask, labels=labels)  # noqa: E731
        plain = plain_run().logits
        for site in ("encoder", "decoder", "cross"):
            keys = _site_keys(m, site, plain_run, 4)
            values = torch.randn_like(keys) * 3.0
            only = build_prefix({"kind": "static", "length": 4, "sites": [site]}, m.backbone.geometry)
            only.set_key_values({site: (keys, values)})
            m_site = type(m)(m.backbone, only)
            m.backbone.injector.deactivate()
            base, _ = _site_outputs(m_site, site, plain_run)
            with_prefix, out = _site_outputs(m_site, site, lambda: m_site(ids, mask, labels=labels))
            assert len(base) == len(with_prefix) == m.backbone.geometry.sites[site].n_layers
            for layer, (a, b) in enumerate(zip(base, with_prefix)):
                change = (a - b).abs().amax() / a.abs().amax().clamp(min=1e-6)
                assert change > 0.05, f"{site} layer {layer}: the prefix changed the attention output by {change:.2e}"
            assert not torch.equal(out.logits, plain), f"{site} prefix does not reach the logits"
            if site == "encoder":
                # the encoder prefix acts on the logits only through the encoder's output: feeding that output
                # to the plain decoder gives the same logits
                m_site.method.activate(m.backbone, mask)
                enc = bart.get_encoder()(input_ids=ids, attention_mask=mask)
                m.backbone.injector.deactivate()
                chained = bart(encoder_outputs=enc, attention_mask=mask, labels=labels).logits
                torch.testing.assert_close(out.logits, chained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,kw", KINDS)
def test_bart_all_sites_receive_gradients(kind, kw):
    m = make_model("bart", kind, length=4, **kw)
    ids, mask, labels = _bart_batch(m.backbone.tokenizer)
    m(ids, mask, labels=labels, source_mask=mask).loss.backward()
    for name, p in m.prefix.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    for p in m.backbone.parameters():
        assert p.grad is None


def _train_steps(m, ids, mask, labels, steps=3):
    opt = torch.optim.AdamW(m.prefix.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = m(ids, mask, labels=labels, source_mask=mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind,kw", KINDS)
def test_gqa_backbone_trains_and_generates(kind, kw):
    m = make_model("llama", kind, length=4, **kw)
    g = m.backbone.geometry.sites["decoder"]
    assert g.n_kv_heads < g.n_heads  # really grouped-query attention
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS)
    labels = ids.masked_fill(mask == 0, -100)
    losses = _train_steps(m, ids, mask, labels, steps=5)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    pids, pmask = batch(tok, TEXTS, side="left")
    greedy = m.generate(pids, pmask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert greedy.shape == (3, 6)
    beams = m.generate(pids, pmask, max_new_tokens=6, num_beams=5, num_return_sequences=5, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    assert beams.shape[0] == 15


def manual_greedy(m, ids, mask, steps, eos=None):
    """Step-by-step greedy decode with full forwards (no cache, no generate); the source mask marks the
    prompt only, so APT gates stay those of the source. `eos` is suppressed, as min_new_tokens does."""
    ids, mask, src = ids.clone(), mask.clone(), mask.clone()
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = m(ids, mask, source_mask=src).logits[:, -1]
        if eos is not None:
            logits[:, eos] = float("-inf")
        nxt = logits.argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        src = torch.cat([src, torch.zeros_like(nxt)[:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,kw", KINDS)
def test_greedy_generate_equals_manual_decode(family, kind, kw):
    m = make_model(family, kind, length=5, **kw)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS, side="left")
    ours = m.generate(ids, mask, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                      pad_token_id=tok.pad_token_id)
    ref = manual_greedy(m, ids, mask, 8, eos=tok.eos_token_id)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("kind,kw", KINDS)
def test_encoder_decoder_greedy_equals_manual_decode_and_beam_runs(family, kind, kw):
    m = make_model(family, kind, length=4, **kw)
    tok = m.backbone.tokenizer
    ids, mask, _ = _bart_batch(tok)
    ours = m.generate(ids, mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    start = m.backbone.model.config.decoder_start_token_id
    dec = torch.full((ids.shape[0], 1), start)
    for _ in range(6):
        with torch.no_grad():
            logits = m(ids, mask, decoder_input_ids=dec, source_mask=mask).logits[:, -1]
            logits[:, tok.eos_token_id] = float("-inf")  # as min_new_tokens
        dec = torch.cat([dec, logits.argmax(-1)[:, None]], 1)
    assert torch.equal(ours[:, : dec.shape[1]], dec)
    beams = m.generate(ids, mask, max_new_tokens=6, num_beams=5, num_return_sequences=3, do_sample=False)
    assert beams.shape[0] == 9


def test_beam_search_with_prefix_is_not_the_plain_model():
    m = make_model("gpt2", length=5)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS, side="left")
    kw = dict(max_new_tokens=8, num_beams=5, do_sample=False, pad_token_id=tok.pad_token_id)
    ours = m.generate(ids, mask, **kw)
    with torch.no_grad():
        plain = m.backbone.model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    assert ours.shape == (3, 8) and not torch.equal(ours, plain)


@pytest.mark.parametrize("family", ["gpt2", "bart", "llama", "t5"])
@pytest.mark.parametrize("kind,kw", KINDS)
def test_gradient_checkpointing_same_loss_and_gradients(family, kind, kw):
    results = []
    for ckpt in (False, True):
        m = make_model(family, kind, length=4, backbone_kwargs={"gradient_checkpointing": ckpt}, **kw)
        m.train()  # checkpointing is only active in training mode; dropout is 0 in these tests
        tok = m.backbone.tokenizer
        if family in ("bart", "t5"):
            ids, mask, labels = _bart_batch(tok)
        else:
            ids, mask = batch(tok, TEXTS)
            labels = ids.masked_fill(mask == 0, -100)
        loss = m(ids, mask, labels=labels, source_mask=mask).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.prefix.named_parameters()}))
        assert m.backbone.model.is_gradient_checkpointing == ckpt
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert g0[n].abs().sum() > 0
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-6)


def test_dtype_auto_picks_bfloat16_only_where_it_is_fast(monkeypatch, capsys):
    """backbone.dtype=auto: bfloat16 on a CUDA GPU or a CPU with bfloat16 matrix kernels, float32 on a CPU
    without them; the choice is printed with its reason and recorded (Backbone.dtype)."""
    from prefixtuning import backbone as bmod

    for cuda, kernels, accel, want in [(False, False, None, "float32"), (False, True, None, "bfloat16"),
                                       (True, False, None, "bfloat16"), (True, False, "cpu", "float32")]:
        monkeypatch.setattr(bmod.torch.cuda, "is_available", lambda c=cuda: c)
        monkeypatch.setattr(bmod, "cpu_has_bf16_kernels", lambda k=kernels: k)
        assert bmod.resolve_dtype("auto", accel)[0] == want
        assert bmod.resolve_dtype("float16", accel) == ("float16", "backbone.dtype")
    monkeypatch.setattr(bmod, "cpu_has_bf16_kernels", lambda: False)
    monkeypatch.setattr(bmod.torch.cuda, "is_available", lambda: False)
    bb = bmod.Backbone.load("tiny-llama", dtype="auto")
    assert bb.dtype == "float32" and next(bb.model.parameters()).dtype == torch.float32
    assert "backbone.dtype=auto on a CPU without bfloat16 matrix kernels" in capsys.readouterr().out
