"""The architecture families of the pinned transformers, built tiny from their config classes, and the oracle
every one of them is held to. Used by tests/test_architectures.py and by `python tests/architectures.py`, which
writes the support table docs/architectures.md from the same verdicts.

The oracle (fp32, tolerance 1e-4):
- decoder-only: a static prefix set to the keys/values the model itself caches for a first segment A; the
  prefixed model run on a second segment B (its tokens at positions |A|.., the project's shifted rule) gives
  the logits the plain model gives B after A; a right-padded batch equals each row alone; greedy `generate`
  equals the plain model's greedy continuation of A+B; one loss step reaches every layer's prefix.
- encoder-decoder, decoder self-attention: the same cache oracle, under the project's rule that decoder tokens
  start at position 0 (families with absolute positions: the plain model's run after A is given positions from
  0 as well; T5's relative bias needs nothing, its prefix columns take the bias of tokens right before B);
  cross-attention: a prefix set to the cross keys/values of extra encoder states H' equals the plain model
  attending to [H'; H]; encoder prefix: changes the output; every site's prefix gets a gradient at every layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prefixtuning.backbone import Backbone  # noqa: E402
from prefixtuning.injection import UnsupportedArchitecture  # noqa: E402
from prefixtuning.model import TunedModel  # noqa: E402
from prefixtuning.prefixes.static import StaticPrefix  # noqa: E402

TOL = 1e-4
V = 96  # vocabulary of every tiny family

_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
_ENCDEC = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
           decoder_start_token_id=0)

# model_type -> the config's keyword arguments (tiny: 2 layers, width 32)
FAMILIES: dict[str, dict] = {
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": {**_DEC, "num_key_value_heads": None},
    "opt": dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0),
    "llama": _DEC, "mistral": _DEC, "qwen2": _DEC, "qwen3": _DEC, "gemma": _DEC, "olmo2": _DEC,
    "cohere": _DEC, "granite": _DEC, "smollm3": _DEC, "starcoder2": _DEC, "phi3": {**_DEC, "head_dim": None},
    "phi": {**_DEC, "num_key_value_heads": 4, "head_dim": None},
    "mixtral": {**_DEC, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**_DEC, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "gemma2": {**_DEC, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0, "sliding_window": 64},
    "gemma3_text": {**_DEC, "sliding_window": 64},
    "gpt_oss": {**_DEC, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64},
    "deepseek_v3": {**_DEC, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
                    "topk_group": 1, "head_dim": None},
    "gptj": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=1,
                 eos_token_id=2),
    "falcon": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                   multi_query=True, max_position_embeddings=64),
    "bloom": dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
    "gpt_neo": dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 1]], window_size=8),
    "codegen": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=1,
                    eos_token_id=2),
    "bart": _ENCDEC, "mbart": _ENCDEC, "pegasus": _ENCDEC, "marian": _ENCDEC,
    "t5": _T5, "mt5": _T5, "umt5": _T5,
    "t5-flan": {**_T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "led": {**_ENCDEC, "max_encoder_position_embeddings": 64, "max_decoder_position_embeddings": 64,
            "attention_window": 4},
}


def model_type(family: str) -> str:
    return family.split("-")[0]


def build(family: str, seed: int = 0):
    """The tiny random model of `family` in fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = {k: v for k, v in FAMILIES[family].items() if v is not None}
    config = AutoConfig.for_model(model_type(family), **kwargs)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config, dtype=torch.float32).eval()


@dataclass
class Verdict:
    family: str
    status: str  # "exact" or "refused"
    detail: str  # the refusal sentence, or what was checked
    worst: float = 0.0  # largest deviation over the checks


def _cache_kv(past, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n_kv, P, hd) keys and values of the first row of a transformers cache."""
    layers = past.self_attention_cache.layers if hasattr(past, "self_attention_cache") else past.layers
    ks = torch.stack([layers[i].keys[0] for i in range(n_layers)])
    vs = torch.stack([layers[i].values[0] for i in range(n_layers)])
    return ks, vs


def _attention_kv(bb: Backbone, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n_kv, T, hd) keys and values the plain model's attention receives for `ids` (decoder-only)."""
    bb.injector.capture = {}
    try:
        with torch.no_grad():
            bb.model(input_ids=ids, use_cache=False)
        got = bb.injector.capture
    finally:
        bb.injector.capture = None
    n = bb.geometry.sites["decoder"].n_layers
    return (torch.stack([got[("decoder", i)][0][0] for i in range(n)]),
            torch.stack([got[("decoder", i)][1][0] for i in range(n)]))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(family: str) -> Verdict:
    """Run the oracle on `family`; refused families return the sentence the project gives them. Raises
    AssertionError where a supported family deviates by more than TOL."""
    model = build(family)
    try:
        bb = Backbone(model, tokenizer=None, name=f"tiny-random-{family}")
    except UnsupportedArchitecture as err:
        return Verdict(family, "refused", str(err))
    verdict = (_check_encoder_decoder if bb.is_encoder_decoder else _check_decoder_only)(family, bb)
    if not verdict.worst <= TOL:
        raise AssertionError(f"{family}: the prefixed model deviates from the oracle by {verdict.worst:.2e} > {TOL}")
    return verdict


def _check_decoder_only(family: str, bb: Backbone) -> Verdict:
    model, g = bb.model, bb.geometry.sites["decoder"]
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(3, V, (1, 3), generator=gen)
    b = torch.randint(3, V, (1, 5), generator=gen)
    P = a.shape[1]
    worst = 0.0
    with torch.no_grad():
        past = model(input_ids=a, use_cache=True).past_key_values
        full = model(input_ids=torch.cat([a, b], 1)).logits[:, P:]
    kv, source = _cache_kv(past, g.n_layers), "cache oracle"
    if kv[0].shape[1:] != (g.n_kv_heads, P, g.head_dim) or kv[1].shape[-1] != g.v_dim:
        # the cache holds compressed latents (multi-head latent attention): take the keys and values the
        # attention computes from them for A, recorded as they enter the attention function
        kv, source = _attention_kv(bb, a), "cache oracle (keys/values expanded from the latent cache)"
    prefix = StaticPrefix(bb.geometry, P)
    prefix.set_key_values({"decoder": kv})
    tuned = TunedModel(bb, prefix).eval()
    with torch.no_grad():
        got = tuned(b, torch.ones_like(b)).logits
    worst = max(worst, _gap(got, full))
    # a right-padded batch: each row equals that row alone
    b2 = torch.randint(3, V, (1, 3), generator=gen)
    batch = torch.zeros(2, 5, dtype=torch.long)
    batch[0], batch[1, :3] = b[0], b2[0]
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        both = tuned(batch, mask).logits
        alone = tuned(b2, torch.ones_like(b2)).logits
    worst = max(worst, _gap(both[0], got[0]), _gap(both[1, :3], alone[0]))
    # greedy generation (cached decoding steps through the prefix): every token it picks is the plain model's
    # argmax after A + B + the tokens before it (a random tiny model has near-ties, hence the tolerance)
    with torch.no_grad():
        out = tuned.generate(b, torch.ones_like(b), max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = torch.cat([a, b, out], 1)
        steps = model(input_ids=seq).logits[0, P + 4: P + 4 + out.shape[1]]  # the logits that chose each token
    picked = steps.gather(-1, out[0][:, None])[:, 0]
    worst = max(worst, (steps.max(-1).values - picked).max().item())
    _check_gradients(family, bb, tuned, b, torch.ones_like(b))
    return Verdict(family, "exact", f"{source}, padded batch, greedy generation, gradients", worst)


def _check_gradients(family: str, bb: Backbone, tuned: TunedModel, ids, mask, **extra) -> None:
    prefix = StaticPrefix(bb.geometry, 2)
    prefix.reset_random(0.5)
    tuned.prefix = prefix
    tuned.train()
    labels = ids.clone() if not bb.is_encoder_decoder else extra.pop("labels")
    tuned(ids, mask, labels=labels).loss.backward()
    tuned.eval()
    for site in prefix.sites:
        for name, table in (("keys", prefix.keys), ("values", prefix.values)):
            grad = table[site].grad
            per_layer = grad.flatten(1).abs().sum(1) if grad is not None else None
            if per_layer is None or not bool((per_layer > 0).all()):
                raise AssertionError(f"{family}: the {site} prefix {name} got no gradient at some layer: {per_layer}")


def _zero_position_hook(model):
    """The project's decoder rule on the plain model: decoder tokens after a cached segment still count their
    positions from 0 (absolute-position families; T5's relative bias needs no hook). Returns the handle."""
    decoder = model.get_decoder()
    emb = getattr(decoder, "embed_positions", None)
    if emb is None:
        return None

    def hook(module, args, kwargs):
        if len(args) > 1:
            args = (args[0], 0, *args[2:])
        if "past_key_values_length" in kwargs:
            kwargs["past_key_values_length"] = 0
        if kwargs.get("position_ids") is not None:  # computed by the decoder from the cache length
            kwargs["position_ids"] = kwargs["position_ids"] - kwargs["position_ids"].min()
        return args, kwargs
    return emb.register_forward_pre_hook(hook, with_kwargs=True)


def _check_encoder_decoder(family: str, bb: Backbone) -> Verdict:
    model, g = bb.model, bb.geometry
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, V, (1, 6), generator=gen)
    xm = torch.ones_like(x)
    start = model.config.decoder_start_token_id
    a = torch.cat([torch.tensor([[start]]), torch.randint(3, V, (1, 2), generator=gen)], 1)
    b = torch.randint(3, V, (1, 4), generator=gen)
    P = a.shape[1]
    worst = 0.0
    # decoder self-attention: the cache oracle under the decoder-from-0 rule
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=x, attention_mask=xm)
        past = model(encoder_outputs=enc, attention_mask=xm, decoder_input_ids=a, use_cache=True).past_key_values
        cached = _cache_kv(past, g.sites["decoder"].n_layers)  # before the cache grows below
        handle = _zero_position_hook(model)
        try:
            want = model(encoder_outputs=enc, attention_mask=xm, decoder_input_ids=b, past_key_values=past,
                         use_cache=True).logits
        finally:
            if handle is not None:
                handle.remove()
    prefix = StaticPrefix(bb.geometry, P, sites=["decoder"])
    prefix.set_key_values({"decoder": cached})
    tuned = TunedModel(bb, prefix).eval()
    with torch.no_grad():
        got = _seq2seq_logits(tuned, x, xm, b)
    worst = max(worst, _gap(got, want))
    # cross-attention: a prefix of the cross keys/values of extra encoder states = attending to [extra; encoder]
    extra = torch.randn(1, 3, g.hidden_size, generator=gen)
    cross_k, cross_v = _cross_kv(bb, extra)
    with torch.no_grad():
        enc2 = type(enc)(last_hidden_state=torch.cat([extra, enc.last_hidden_state], 1))
        want = model(encoder_outputs=enc2, attention_mask=torch.ones(1, 3 + x.shape[1], dtype=torch.long),
                     decoder_input_ids=b).logits
    cross = StaticPrefix(bb.geometry, 3, sites=["cross"])
    cross.set_key_values({"cross": (cross_k, cross_v)})
    tuned.prefix = cross
    with torch.no_grad():
        got = _seq2seq_logits(tuned, x, xm, b, encoder_outputs=enc)
    worst = max(worst, _gap(got, want))
    # encoder prefix: changes the output
    encp = StaticPrefix(bb.geometry, 2, sites=["encoder"])
    encp.reset_random(1.0)
    tuned.prefix = encp
    with torch.no_grad():
        changed = _gap(_seq2seq_logits(tuned, x, xm, b), model(input_ids=x, attention_mask=xm, decoder_input_ids=b).logits)
    if not changed > 1e-6:
        raise AssertionError(f"{family}: an encoder prefix does not change the output ({changed})")
    labels = torch.randint(3, V, (1, 4), generator=gen)
    _check_gradients(family, bb, tuned, x, xm, labels=labels)
    # beam search and greedy decode run through the prefix (each beam sees it)
    tuned.prefix = prefix
    with torch.no_grad():
        greedy = tuned.generate(x, xm, max_new_tokens=5, do_sample=False, num_beams=1)
        beams = tuned.generate(x, xm, max_new_tokens=5, do_sample=False, num_beams=3)
    if greedy.shape[0] != 1 or beams.shape[0] != 1:
        raise AssertionError(f"{family}: generate returned {greedy.shape} / {beams.shape}")
    return Verdict(family, "exact", "decoder cache oracle (decoder tokens from 0), cross-attention oracle, encoder "
                   "prefix effect, gradients at every site and layer", worst)


def _seq2seq_logits(tuned: TunedModel, x, xm, b, encoder_outputs=None):
    """Logits of decoder inputs `b` (given as they are, no shift) for encoder input x with the method active."""
    bb = tuned.backbone
    tuned.method.activate(bb, xm)
    try:
        kw = {"encoder_outputs": encoder_outputs} if encoder_outputs is not None else {"input_ids": x}
        return bb.model(attention_mask=xm, decoder_input_ids=b, use_cache=False, **kw).logits
    finally:
        tuned.method.deactivate(bb)


def _cross_kv(bb: Backbone, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n_kv, T, hd) keys and values every cross-attention layer computes from encoder states `states`."""
    ks, vs = [], []
    for _, mod in bb.injector.sites["cross"]:
        k_proj = getattr(mod, "k_proj", None) or getattr(mod, "k")
        v_proj = getattr(mod, "v_proj", None) or getattr(mod, "v")
        g = bb.geometry.sites["cross"]
        with torch.no_grad():
            ks.append(k_proj(states).view(1, -1, g.n_kv_heads, g.head_dim).transpose(1, 2)[0])
            vs.append(v_proj(states).view(1, -1, g.n_kv_heads, g.v_dim).transpose(1, 2)[0])
    return torch.stack(ks), torch.stack(vs)


def support_table(verdicts: list[Verdict]) -> str:
    lines = ["| family | verdict | what was checked, or the sentence a refused family gets |", "| --- | --- | --- |"]
    for v in verdicts:
        lines.append(f"| {v.family} | {v.status} | {v.detail.replace('|', '/')} |")
    return "\n".join(lines)


DOC_HEAD = """# Supported architectures

Every causal-LM and encoder-decoder family below is built tiny (2 layers, width 32, random weights) from its
config class in the pinned transformers and held to one oracle (`tests/architectures.py`, run by
`tests/test_architectures.py`; fp32, tolerance 1e-4):

- **decoder-only**: a static prefix set to the keys/values the model itself caches for a first segment A; the
  prefixed model on a second segment B (its tokens at positions |A|.., the project's shifted rule) gives the
  logits of the plain model on A + B; a right-padded batch equals each row alone; every token greedy `generate`
  picks (cached decoding steps through the prefix) is the plain model's argmax after A + B + the tokens before
  it; one loss step gives every layer's prefix a gradient.
- **encoder-decoder**: the same cache oracle on the decoder self-attention under the encoder-decoder rule
  (decoder tokens start at position 0; for absolute-position families the plain model's run after A is given
  positions from 0 too, T5's relative bias needs nothing); a cross-attention prefix set to the cross keys/values
  of extra encoder states H' equals the plain model attending to [H'; H]; an encoder prefix changes the output;
  the prefix of every site gets a gradient at every layer; greedy and beam search run.

A family is refused when the backbone loads, before any data or training work, with the sentence in the table
(a model that does not route its attention through transformers' attention interface cannot be reached by the
prefix). Position rules, the T5 bias of prefix columns and sliding windows: see [methods](methods.md#positions).

Regenerate with `python tests/architectures.py --write` (transformers {version}).

"""


if __name__ == "__main__":
    import transformers

    results = []
    for fam in FAMILIES:
        try:
            results.append(check(fam))
        except Exception as err:  # noqa: BLE001 - the table shows what failed
            results.append(Verdict(fam, "FAILED", f"{type(err).__name__}: {err}"))
        print(f"{fam:14s} {results[-1].status:8s} {results[-1].worst:.1e} {results[-1].detail[:150]}", flush=True)
    if "--write" in sys.argv:
        if any(r.status == "FAILED" for r in results):
            raise SystemExit("not written: some family failed the oracle")
        doc = ROOT / "docs" / "architectures.md"
        doc.write_text(DOC_HEAD.replace("{version}", transformers.__version__) + support_table(results) + "\n")
        print(f"wrote {doc}")
