"""The injection mechanism against independent computations: explicit attention math, the cache path
(DynamicCache), and HF PEFT's prefix tuning, for the same prefix tensors."""

import math

import pytest
import torch
from transformers import DynamicCache

from conftest import TEXTS, batch, make_model, peft_prefix_twin

pytestmark = pytest.mark.fast  # the inner-loop tier (make test-fast)


def explicit_gpt2_logits(model, input_ids, attention_mask, pk, pv, offset):
    """GPT-2 forward written out by hand: softmax(q [Pk; k]^T / sqrt(hd) + mask) [Pv; v].

    pk, pv: (L, n_heads, P, hd) prefix keys/values. Real tokens sit at positions offset + 0, 1, ...
    """
    tr = model.transformer
    B, T = input_ids.shape
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
    h = tr.wte(input_ids) + tr.wpe(pos)
    P = pk.shape[2]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), allowed], dim=-1)  # prefix always visible
    for i, block in enumerate(tr.h):
        a = block.attn
        x = block.ln_1(h)
        q, k, v = (x @ a.c_attn.weight + a.c_attn.bias).split(a.embed_dim, dim=2)
        nh, hd = a.num_heads, a.head_dim
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        k = torch.cat([pk[i].expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv[i].expand(B, -1, -1, -1), v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, P + T)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        h = h + (out @ a.c_proj.weight + a.c_proj.bias)
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(tr.ln_f(h))


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("shift", [True, False])
def test_equals_explicit_attention(texts, shift):
    m = make_model("gpt2", length=5, shift=shift)
    ids, mask = batch(m.backbone.tokenizer, texts)
    k, v = m.prefix.key_values()["decoder"]
    with torch.no_grad():
        ours = m(ids, mask).logits
        ref = explicit_gpt2_logits(m.backbone.model, ids, mask, k[:, 0], v[:, 0], 5 if shift else 0)
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-5
    # and the prefix matters: without it the logits differ
    m.backbone.injector.deactivate()
    with torch.no_grad():
        plain = m.backbone.model(input_ids=ids, attention_mask=mask).logits
    assert (plain - ours)[real].abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["padded", "unpadded"])
def test_equals_cache_path(family, texts):
    """Same prefix fed as a DynamicCache of length P (mask P + L, positions from P) to the plain model."""
    m = make_model(family, length=3)
    ids, mask = batch(m.backbone.tokenizer, texts)
    k, v = m.prefix.key_values()["decoder"]
    B = ids.shape[0]
    with torch.no_grad():
        ours = m(ids, mask).logits
        m.backbone.injector.deactivate()
        cache = DynamicCache([(k[i].expand(B, -1, -1, -1).clone(), v[i].expand(B, -1, -1, -1).clone())
                              for i in range(k.shape[0])])
        full_mask = torch.cat([torch.ones(B, 3, dtype=mask.dtype), mask], dim=1)
        ref = m.backbone.model(input_ids=ids, attention_mask=full_mask, past_key_values=cache,
                               position_ids=m.position_ids(mask)).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["padded", "unpadded"])
def test_equals_peft_logits(texts):
    m = make_model("gpt2", length=6)
    peft_model = peft_prefix_twin(m)
    ids, mask = batch(m.backbone.tokenizer, texts)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
        ours = m(ids, mask).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-5


def test_equals_peft_greedy_generate():
    m = make_model("gpt2", length=6)
    peft_model = peft_prefix_twin(m)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS, side="left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    ours = m.generate(ids, mask, **kw)
    with torch.no_grad():
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_state_does_not_leak_between_models():
    """Deactivating restores the stock attention exactly."""
    m = make_model("gpt2")
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        m(ids, mask)
        m.backbone.injector.deactivate()
        after = m.backbone.model(input_ids=ids, attention_mask=mask).logits
    from transformers import AutoModelForCausalLM as A
    fresh = A.from_pretrained(m.backbone.model.name_or_path).eval()
    with torch.no_grad():
        ref = fresh(input_ids=ids, attention_mask=mask).logits
    assert (after - ref)[mask.bool()].abs().max().item() <= 1e-6


@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("masked", [False, True, "additive"])
@pytest.mark.parametrize("b0", [1, 2, 4], ids=["shared", "beams", "per-row"])
def test_decode_step_attention_equals_sdpa_over_concatenated_keys(n_kv, masked, b0):
    """The copy-free decoding step equals plain softmax attention over [prefix; cache], with the prefix
    given once (b0=1), once per example of a beam batch (b0=2 for 2 beams each) or once per row."""
    from types import SimpleNamespace

    from prefixtuning.injection import PrefixState, _decode_step_attention, match_rows

    torch.manual_seed(0)
    B, H, hd, L, P = 4, 4, 8, 7, 5
    q = torch.randn(B, H, 1, hd)
    k, v = torch.randn(B, n_kv, L, hd), torch.randn(B, n_kv, L, hd)
    pk, pv = torch.randn(b0, n_kv, P, hd), torch.randn(b0, n_kv, P, hd)
    real_mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    prefix_mask = None
    if masked:
        real_mask[0, ..., :3] = False  # left padding of row 0
        prefix_mask = torch.ones(b0, P, dtype=torch.bool)
        prefix_mask[-1, 3:] = False  # the last prefix row is shorter
        if b0 > 1:
            prefix_mask[0] = False  # the first has none
    given = real_mask
    if masked == "additive":
        given = torch.zeros(B, 1, 1, L).masked_fill(~real_mask, torch.finfo(torch.float32).min)
    tag = SimpleNamespace(site="decoder")
    state = PrefixState(kv={}, prefix_mask={"decoder": prefix_mask} if prefix_mask is not None else None)
    out, _ = _decode_step_attention(None, q, k, v, pk, pv, given, state, tag, B, None)
    full_k = torch.cat([match_rows(pk, B), k], 2).repeat_interleave(H // n_kv, dim=1)
    full_v = torch.cat([match_rows(pv, B), v], 2).repeat_interleave(H // n_kv, dim=1)
    visible = match_rows(prefix_mask, B) if prefix_mask is not None else torch.ones(B, P, dtype=torch.bool)
    full_mask = torch.cat([visible[:, None, None, :], real_mask], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_state_over_forwards_with_different_masks_equals_fresh_states(family):
    """The mask with prefix columns is built once per forward pass and reused by the other layers; a state
    kept over several passes (as in generation, or a caller's own loop) must rebuild it whenever the model
    hands over another mask: padded, unpadded, other lengths, then the first again."""
    m = make_model(family, length=4)
    tok = m.backbone.tokenizer
    batches = [batch(tok, TEXTS), batch(tok, TEXTS[:1]), batch(tok, TEXTS[1:]), batch(tok, TEXTS)]
    fresh = []
    with torch.no_grad():
        for ids, mask in batches:
            fresh.append(m(ids, mask).logits)  # activates a new state per call
        state = m.backbone.injector.state
        for (ids, mask), ref in zip(batches, fresh):
            m.backbone.injector.activate(state)  # the same state object for every pass
            out = m.backbone.model(input_ids=ids, attention_mask=mask, position_ids=m.position_ids(mask)).logits
            assert torch.equal(out, ref)
    assert state.masks, "the pass did not go through the mask reuse"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unpadded_batches_take_the_lower_right_causal_bias_with_the_same_outputs(family, monkeypatch):
    """An unpadded causal batch goes to SDPA with torch's causal_lower_right bias (the flash-kernel path on
    CUDA); its logits and prefix gradients equal the explicit-mask path's (float32, 1e-6), and a padded batch
    keeps the mask."""
    from prefixtuning import injection

    calls = []
    real = injection._sdpa_lower_right
    monkeypatch.setattr(injection, "_sdpa_lower_right", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(fast: bool, texts):
        monkeypatch.setattr(injection, "FAST_PATH", fast)
        m = make_model(family, "static", length=5).train()
        ids, mask = batch(m.backbone.tokenizer, texts)
        logits = m(ids, mask).logits
        logits[mask.bool()].pow(2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in m.prefix.parameters()]

    a, ga = run(True, TEXTS[:1])
    n = len(calls)
    b, gb = run(False, TEXTS[:1])
    assert n > 0 and len(calls) == n  # taken when on, not when off
    assert (a - b).abs().max().item() <= 1e-6
    assert all((x - y).abs().max().item() <= 1e-6 and x.abs().sum() > 0 for x, y in zip(ga, gb))
    run(True, TEXTS)  # right-padded: the mask tensor, not the bias
    assert len(calls) == n
