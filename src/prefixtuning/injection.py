"""The one place where prefix keys/values enter a model.

Every prefix kind, every backbone family, training, greedy and beam generation go through the
attention function registered here. It runs inside each attention module of the backbone, after the
module has projected its own keys and values (and, for rotary models, rotated them), and:

1. looks up the prefix of this attention site (`decoder`, `encoder` or `cross`) and layer,
2. broadcasts its rows to the batch it sees (1 -> B, or B -> B * num_beams by repeat-interleave, so beam
   search needs no pre-expanded cache),
3. multiplies it by the APT gate of that layer if the prefix is gated,
4. concatenates it in front of the layer's keys/values, pads the attention mask with visible prefix
   columns, and calls transformers' stock SDPA attention; when the family modifies the scores inside
   attention (T5's relative position bias, Gemma2's logit soft-capping, gpt-oss's sinks) it computes the
   softmax itself and applies the modifier to the prefix columns too (`_eager_attention`).

Why not `past_key_values`: the cache path cannot reach the encoder or cross-attention, needs beam
pre-expansion, breaks under gradient checkpointing, and cannot see the layer input that APT gates
depend on. See DESIGN.md for the measured failure modes.

Positions: the injected prefix does not occupy positions by itself. Callers choose where real tokens
start (see `PrefixTuningModel.position_ids`): the paper and PEFT start them at P ("shifted"), which
this project does by default for decoder-only backbones; encoder-decoders start their tokens at 0.
Relative position biases (T5 family): prefix column j of P gets the bias of a key at relative position
(j - P) - i from query i, as if the prefix were P tokens right before the sequence (the bias a first segment
of P tokens gets on the cache path); cross-attention has no bias in T5, so its prefix columns get none.
Sliding-window layers (Mistral, Gemma2/3, ...): the window applies to the real tokens exactly as the model
applies it; the prefix columns stay visible to every query, by design (a prefix is the task's memory, not
a stretch of text that scrolls out of view).

Masks: when a batch has no padding, transformers passes `attention_mask=None` and relies on SDPA's
`is_causal`, whose triangle is aligned top-left. With P prefix keys in front, key length != query
length and that alignment would be wrong (and `sdpa_attention_forward` would even crop the keys).
Prefix columns visible and the causal part aligned bottom-right is exactly a causal mask aligned to the
bottom-right of the whole (q, P + kv) score matrix: an unpadded batch passes that to SDPA as torch's
`causal_lower_right` bias, not a tensor, so CUDA's flash / memory-efficient kernels stay available; a padded
batch (or per-row prefixes) gets the mask tensor built here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import UserError

# no "sdpa" in the name: transformers refuses an "*sdpa*" implementation for families that need the scores
# themselves (Gemma2's soft-capping), which this function handles
ATTN_IMPLEMENTATION = "prefix_attention"
# keyword arguments by which a family modifies the attention scores (the function then computes the softmax)
SCORE_MODIFIERS = ("position_bias", "softcap", "s_aux", "sinks")
SITES = ("decoder", "encoder", "cross")

# A gate function maps (site, layer, pooled hidden state (B, d)) to a per-token scale (B, P).
GateFn = Callable[[str, int, Tensor], Tensor]


@dataclass
class PrefixState:
    """What the attention function needs during one forward pass or one `generate` call.

    kv: site -> (keys, values), each (n_layers, B0, n_kv_heads, P, head_dim); B0 is 1 (shared prefix) or
        the batch size (one prefix per row).
    gate_fn: APT's gate, or None for ungated prefixes.
    source_mask: (B0, T) 1 on the source tokens the gate pools over (decoder-only: the prompt; encoder-
        decoder: the encoder input).
    gates: (site, layer) -> (B, P), set by a pre-hook right before each attention call.
    keep_gates: generation: compute each gate once, at prefill over the source, and keep it for every
        decoding step. Training: recompute at every call, so the recomputation of gradient checkpointing
        replays exactly what the forward did.
    """

    kv: dict[str, tuple[Tensor, Tensor]]
    gate_fn: GateFn | None = None
    source_mask: Tensor | None = None
    gates: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    keep_gates: bool = False
    pooled_encoder: Tensor | None = None
    # site -> (B0, P) bool, False on padded prefix positions: rows of a mixed batch may carry prefixes of
    # different lengths, or none at all (all False = the plain backbone for that row)
    prefix_mask: dict[str, Tensor] | None = None
    # site -> (the mask the model passed, (B, q, kv, P, causal), that mask with the prefix columns): the
    # last one built, reused by the site's other layers in the same forward pass
    masks: dict = field(default_factory=dict)
    # PrefixMemory-Tuning (prefixes/memory.py): site -> M, (n_layers, B0, n_kv_heads, F, value head size), read
    # outside the softmax as phi(q) M and added to the attention output of every query head of the kv group;
    # `feature_map` is phi, elementwise (F = head size). A site may have keys/values, a memory, or both (a bank
    # batch that mixes kinds); rows of a memory whose M is zero compute the plain attention exactly.
    memory: dict[str, Tensor] = field(default_factory=dict)
    feature_map: Callable[[Tensor], Tensor] | None = None


def match_rows(t: Tensor, rows: int, what: str = "prefix") -> Tensor:
    """Broadcast the leading dim of `t` to `rows`: 1 -> rows (expand) or B -> B*k (repeat-interleave, beams)."""
    n = t.shape[0]
    if n == rows:
        return t
    if n == 1:
        return t.expand(rows, *t.shape[1:])
    if rows % n == 0:
        return t.repeat_interleave(rows // n, dim=0)
    raise ValueError(f"{what} has {n} rows but the attention call has a batch of {rows}; cannot broadcast")


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of hidden (B, T, d) over positions where mask (B, T) is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, **kwargs):
    out, probs = _attention_with_prefix(module, query, key, value, attention_mask, **kwargs)
    tag = getattr(module, "_prefix_tag", None)
    state = tag.injector.state if tag is not None else None
    if state is not None and tag.site in state.memory:
        out = out + memory_read(query, state.memory[tag.site][tag.layer], state.feature_map).to(out.dtype)
    return out, probs


def memory_read(query: Tensor, memory: Tensor, feature_map: Callable[[Tensor], Tensor]) -> Tensor:
    """PrefixMemory-Tuning's term phi(q_i)^T M for every query token and head, outside the softmax.

    query (B, H, q, hd) as the attention receives it (after the family's rotary embedding); memory (B0, n_kv, F,
    vd) with B0 dividing B (1: one memory for the batch; per row, or per row before beam expansion). The H query
    heads read the memory of their kv group, as they read that group's keys and values. Returns (B, q, H, vd),
    the layout of the attention output."""
    B, H, q_len, hd = query.shape
    n_kv = memory.shape[1]
    if H % n_kv:
        raise ValueError(f"{H} query heads cannot share {n_kv} memory heads")
    mem = match_rows(memory, B, "memory").to(query.dtype)  # (B, n_kv, F, vd)
    phi = feature_map(query).reshape(B, n_kv, (H // n_kv) * q_len, hd)  # heads of a group stacked as queries
    out = torch.matmul(phi, mem)  # (B, n_kv, g * q, vd)
    return out.reshape(B, H, q_len, mem.shape[-1]).transpose(1, 2)


def _attention_with_prefix(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, **kwargs):
    tag = getattr(module, "_prefix_tag", None)
    if tag is not None and tag.injector.observed is not None:  # the reach probe (PrefixInjector.probe)
        tag.injector.observed[(tag.site, tag.layer)] = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
    if tag is not None and tag.injector.capture is not None:  # word-activation initialization
        tag.injector.capture[(tag.site, tag.layer)] = (key.detach().clone(), value.detach().clone())
    state = tag.injector.state if tag is not None else None
    if state is None or tag.site not in state.kv:
        if all(kwargs.get(k) is None for k in SCORE_MODIFIERS):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        # the plain model on a family whose scores SDPA cannot compute (no prefix here, so none in front)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None and is_causal and q_len > 1:
            qi = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
            attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= qi)[None, None]
        return _eager_attention(module, query, key, value, attention_mask, scaling=kwargs.get("scaling"),
                                dropout=kwargs.get("dropout", 0.0), softcap=kwargs.get("softcap"),
                                position_bias=kwargs.get("position_bias"),
                                sinks=kwargs.get("s_aux", kwargs.get("sinks")))

    batch, _, q_len, _ = query.shape  # (B, n_heads, q, hd)
    kv_len = key.shape[2]  # (B, n_kv, kv, hd)
    pk, pv = state.kv[tag.site]
    pk, pv = pk[tag.layer], pv[tag.layer]  # (B0, n_kv, P, hd), B0 = 1 or the batch before beams
    gate = state.gates.get((tag.site, tag.layer))
    if gate is not None:
        g = match_rows(gate, batch, "gate")[:, None, :, None]  # (B, 1, P, 1)
        pk, pv = match_rows(pk, batch) * g, match_rows(pv, batch) * g
    n_prefix = pk.shape[2]
    plain_softmax = all(kwargs.get(k) is None for k in SCORE_MODIFIERS)
    if q_len == 1 and plain_softmax and not torch.is_grad_enabled() and kwargs.get("dropout", 0.0) == 0.0:
        # a decoding step: scores against prefix and cache computed apart, without copying the cache or
        # repeating the prefix per row
        return _decode_step_attention(module, query, key, value, pk.to(key.dtype), pv.to(value.dtype),
                                      attention_mask, state, tag, batch, kwargs.get("scaling"))
    pk, pv = match_rows(pk, batch), match_rows(pv, batch)  # (B, n_kv, P, hd)
    key = torch.cat([pk.to(key.dtype), key], dim=2)  # (B, n_kv, P + kv, hd)
    value = torch.cat([pv.to(value.dtype), value], dim=2)

    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if (FAST_PATH and attention_mask is None and is_causal and q_len > 1 and plain_softmax
            and not (state.prefix_mask and state.prefix_mask.get(tag.site) is not None)
            and key.shape[-1] == value.shape[-1]):
        return _sdpa_lower_right(module, query, key, value, kwargs.get("dropout", 0.0), kwargs.get("scaling"))
    # The mask with the prefix columns is the same for every layer of a site within one forward pass (the
    # model hands each layer the same mask object): build it once per pass and site, reuse it after.
    attention_mask = _cached_mask_with_prefix(attention_mask, state, tag.site, batch, q_len, kv_len, n_prefix,
                                              is_causal, query.device)
    if plain_softmax:
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = torch.cat([_prefix_position_bias(module, tag, bias, q_len, kv_len, n_prefix), bias], dim=-1)
    return _eager_attention(module, query, key, value, attention_mask, scaling=kwargs.get("scaling"),
                            dropout=kwargs.get("dropout", 0.0), softcap=kwargs.get("softcap"), position_bias=bias,
                            sinks=kwargs.get("s_aux", kwargs.get("sinks")))


# Unpadded causal batches go to SDPA with torch's lower-right causal bias instead of a materialized mask
# (`_sdpa_lower_right`); tests switch it off to compare with the explicit-mask path.
FAST_PATH = True


def _sdpa_lower_right(module, query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling):
    """An unpadded causal batch with the prefix in front of the keys: query i sees the P prefix keys and the real
    keys up to its own position, which is exactly a causal mask aligned to the bottom-right corner of the
    (q, P + kv) score matrix. It is passed to SDPA as `causal_lower_right`, not as a tensor, so on CUDA SDPA can
    choose its flash or memory-efficient kernels; where no such kernel applies (the CPU) torch builds the same
    mask itself."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bias = causal_lower_right(query.shape[2], key.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _prefix_position_bias(module, tag, bias: Tensor, q_len: int, kv_len: int, n_prefix: int) -> Tensor:
    """The relative position bias of the P prefix columns (module docstring: keys at relative position
    (j - P) - i), from the site's own bias table; zeros where the site has none (T5's cross-attention)."""
    table = tag.injector.bias_tables.get(tag.site)
    if getattr(module, "has_relative_attention_bias", False):
        table = module  # UMT5: every layer has its own table
    shape = (bias.shape[0], bias.shape[1], q_len, n_prefix)
    if table is None:
        return bias.new_zeros(()).expand(shape)
    device = bias.device
    query_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)  # bottom-right: decoding steps
    prefix_pos = torch.arange(n_prefix, device=device)[None, :] - n_prefix
    relative = prefix_pos - query_pos  # (q, P)
    if "bidirectional" in inspect.signature(table._relative_position_bucket).parameters:  # T5, mT5, LongT5
        bucket = table._relative_position_bucket(relative, bidirectional=not table.is_decoder,
                                                 num_buckets=table.relative_attention_num_buckets,
                                                 max_distance=table.relative_attention_max_distance)
    else:  # UMT5: the module reads its own settings
        bucket = table._relative_position_bucket(relative)
    values = table.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # (1, H, q, P)
    return values.to(bias.dtype).expand(shape)


def _eager_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *,
                     scaling: float | None, dropout: float = 0.0, softcap: float | None = None,
                     position_bias: Tensor | None = None, sinks: Tensor | None = None):
    """softmax(modify(q [Pk; K]^T * scaling) + mask) [Pv; V], with the family's score modifiers applied in the
    order its own eager attention applies them: soft-capping (Gemma2), then the position bias (T5), the mask,
    and the sink logits (gpt-oss) as an extra column that takes probability but has no value.

    query (B, H, q, hd); key/value (B, n_kv, P + kv, hd) with the prefix in front; masks bool (True =
    attend) or additive. Returns (B, q, H, hd) and the probabilities, as transformers' functions do."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, q, P + kv)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    if sinks is not None:
        column = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        scores = torch.cat([scores, column], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _cached_mask_with_prefix(attention_mask, state, site, batch, q_len, kv_len, n_prefix, is_causal, device):
    """`_mask_with_prefix`, built once per forward pass (or decoding step) and site: every layer of a site
    gets the same mask object from the model, so the last one built is reused while that object and the
    shapes are the same."""
    shape = (batch, q_len, kv_len, n_prefix, bool(is_causal))
    cached = state.masks.get(site)
    if cached is not None and cached[0] is attention_mask and cached[1] == shape:
        return cached[2]
    built = _mask_with_prefix(attention_mask, state, site, batch, q_len, kv_len, n_prefix, is_causal, device)
    state.masks[site] = (attention_mask, shape, built)
    return built


def _mask_with_prefix(attention_mask, state, site, batch, q_len, kv_len, n_prefix, is_causal, device):
    """The layer's attention mask with P visible (or, per row, padded) prefix columns in front; None when
    SDPA needs no mask at all."""
    pm = state.prefix_mask.get(site) if state.prefix_mask else None
    if pm is not None:
        pm = match_rows(pm, batch, "prefix mask")[:, None, None, :]  # (B, 1, 1, P)
    if attention_mask is None:
        real = None
        if is_causal and q_len > 1:
            # query i sits at absolute index kv_len - q_len + i among the real keys: bottom-right alignment
            qi = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            kj = torch.arange(kv_len, device=device)[None, :]
            real = (kj <= qi)[None, None]  # (1, 1, q, kv)
        if real is None and pm is None:
            return None
        if real is None:
            real = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        rows = batch if pm is not None else 1
        visible = pm if pm is not None else torch.ones(1, 1, 1, n_prefix, dtype=torch.bool, device=device)
        return torch.cat([visible.expand(rows, 1, q_len, n_prefix), real.expand(rows, 1, q_len, kv_len)],
                         dim=-1)  # (B|1, 1, q, P + kv)
    lead = (max(attention_mask.shape[0], pm.shape[0] if pm is not None else 1), attention_mask.shape[1],
            attention_mask.shape[2])
    visible = pm if pm is not None else torch.ones((), dtype=torch.bool, device=attention_mask.device)
    visible = visible.expand(*lead, n_prefix)
    if attention_mask.dtype == torch.bool:
        pad = visible
    else:  # additive float mask
        pad = torch.zeros((), dtype=attention_mask.dtype, device=attention_mask.device).expand(*lead, n_prefix)
        pad = pad.masked_fill(~visible, torch.finfo(attention_mask.dtype).min)
    return torch.cat([pad, attention_mask.expand(*lead, attention_mask.shape[-1])], dim=-1)


def _decode_step_attention(module, query, key, value, pk, pv, attention_mask, state, tag, batch, scaling):
    """softmax([q Pk^T, q K^T]) [Pv; V] for one query token: the scores against the prefix and against the
    cache are computed apart and joined (small: one score per key), so neither the cache's keys are copied
    behind the prefix at every step, nor the prefix repeated for every row or beam.

    query (B, H, 1, hd); key/value (B, n_kv, kv, hd); pk/pv (B0, n_kv, P, hd) with B0 dividing B (1: one
    prefix for every row; the batch before beam expansion: consecutive rows share a prefix; B). Grouped-query
    heads are handled by viewing the H query heads as (n_kv, H / n_kv) groups.
    """
    B, H, _, hd = query.shape
    n_kv = key.shape[1]
    g = H // n_kv
    b0, P = pk.shape[0], pk.shape[2]
    if B % b0:
        raise ValueError(f"prefix has {b0} rows but the attention call has a batch of {B}; cannot broadcast")
    r = B // b0  # rows sharing each prefix row
    scale = scaling if scaling is not None else hd ** -0.5
    q = query.reshape(B, n_kv, g, hd)  # (B, n_kv, g, hd)
    s_real = torch.matmul(q, key.transpose(-1, -2))  # (B, n_kv, g, kv)
    # rows sharing a prefix row are stacked as extra queries of it: (B0, n_kv, r * g, hd) x (B0, n_kv, hd, P)
    q_shared = q.view(b0, r, n_kv, g, hd).transpose(1, 2).reshape(b0, n_kv, r * g, hd)
    s_pref = torch.matmul(q_shared, pk.transpose(-1, -2))  # (B0, n_kv, r * g, P)
    s_pref = s_pref.view(b0, n_kv, r, g, P).transpose(1, 2).reshape(B, n_kv, g, P)
    scores = torch.cat([s_pref, s_real], dim=-1) * scale  # (B, n_kv, g, P + kv)
    # (B|1, 1, 1, P + kv), bool (True = attend) or additive; None = attend to all
    keep = _cached_mask_with_prefix(attention_mask, state, tag.site, B, 1, key.shape[2], P, False, scores.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min) if keep.dtype == torch.bool \
            else scores + keep
    probs = torch.softmax(scores, dim=-1)
    p_pref = probs[..., :P].reshape(b0, r, n_kv, g, P).transpose(1, 2).reshape(b0, n_kv, r * g, P)
    vd = pv.shape[-1]
    out_pref = torch.matmul(p_pref, pv).view(b0, n_kv, r, g, vd).transpose(1, 2).reshape(B, n_kv, g, vd)
    out = out_pref + torch.matmul(probs[..., P:], value)  # (B, n_kv, g, vd)
    # (B, 1, H, vd) as sdpa returns; vd, the value head size, differs from hd under multi-head latent attention
    return out.reshape(B, H, 1, vd).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _prefix_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class UnsupportedArchitecture(UserError):
    """A backbone family the prefix cannot reach exactly; raised when the backbone loads, before any work."""


@dataclass(frozen=True)
class _Tag:
    injector: "PrefixInjector"
    site: str
    layer: int


def classify_site(module_path: str) -> str:
    """Attention site of a module from its path in the model: cross-attention, encoder or decoder self."""
    p = module_path.lower()
    if any(s in p for s in ("encoder_attn", "crossattention", "cross_attn", "cross_attention", "encdecattention")):
        return "cross"
    parts = p.split(".")
    if "encoder" in parts:
        return "encoder"
    return "decoder"


def find_attention_modules(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Attention modules of a Hugging Face model, grouped by site, in layer order.

    An attention module is one that carries `layer_idx` and dispatches through the attention
    interface (its class name ends in "Attention"). Wrappers that contain such a module are skipped.
    """
    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, mod in model.named_modules():
        if type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx"):
            found.setdefault(classify_site(path), []).append((path, mod))
    return found


class PrefixInjector:
    """Tags a model's attention modules and holds the prefix state the attention function reads.

    `activate(state)` leaves the state in place until the next `activate` or `deactivate`, on purpose:
    gradient checkpointing recomputes layers during backward, after forward has returned, and must see
    the same prefix then.
    """

    def __init__(self, model: nn.Module, expected_layers: dict[str, int]):
        self.state: PrefixState | None = None
        self.capture: dict | None = None  # when a dict, each attention call stores its own keys/values
        self.observed: dict | None = None  # when a dict, each attention call stores its shapes (probe)
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        self.sites = find_attention_modules(model)
        if set(expected_layers) == {"encoder"} and set(self.sites) == {"decoder"}:
            # an encoder-only model whose layers are not under an `encoder` module (ModernBERT): one site
            self.sites = {"encoder": self.sites["decoder"]}
        got = {s: len(m) for s, m in self.sites.items()}
        if got != expected_layers:
            raise UnsupportedArchitecture(
                f"{self.model_type}: the attention modules found per site ({got or 'none'}) do not match the "
                f"layers of its config ({expected_layers}), so a prefix cannot be placed in every layer; this "
                f"family is not supported (docs/architectures.md lists the supported ones)")
        # the relative-position bias table of each site (T5 family: the first layer's), for the prefix columns
        self.bias_tables = {site: next((m for _, m in mods if getattr(m, "has_relative_attention_bias", False)),
                                       None) for site, mods in self.sites.items()}
        self._hooks = []
        for site, mods in self.sites.items():
            for layer, (_, mod) in enumerate(mods):
                mod._prefix_tag = _Tag(self, site, layer)
                self._hooks.append(mod.register_forward_pre_hook(self._gate_hook, with_kwargs=True))
        encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
        self.is_encoder_decoder = encoder is not None
        if encoder is not None:
            self._hooks.append(encoder.register_forward_hook(self._encoder_hook, with_kwargs=True))
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        used = getattr(model.config, "_attn_implementation", None)
        if used != ATTN_IMPLEMENTATION:
            raise UnsupportedArchitecture(
                f"{self.model_type}: its attention does not go through transformers' attention interface (transformers "
                f"kept attention implementation {used!r}), so a prefix would not take effect; this family is not "
                f"supported (docs/architectures.md lists the supported ones)")

    @torch.no_grad()
    def probe(self, model: nn.Module) -> dict[tuple[str, int], tuple[tuple, tuple, tuple]]:
        """Run the model once on two tokens and record, per (site, layer), the shapes of the query, keys and
        values that reached this module's attention function. A layer missing from the record computes
        attention in its own code, where no prefix can reach it: refused, naming its class."""
        self.observed = {}
        ids = torch.tensor([[1, 2]], device=next(model.parameters()).device)
        extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
        was_training = model.training
        model.eval()
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
            observed = self.observed
        finally:
            self.observed = None
            model.train(was_training)
        missing = [(site, layer, type(mod).__name__) for site, mods in self.sites.items()
                   for layer, (_, mod) in enumerate(mods) if (site, layer) not in observed]
        if missing:
            site, layer, cls = missing[0]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UnsupportedArchitecture(
                f"{self.model_type}: {cls} ({site} layer {layer}{more}) "
                f"computes attention in its own code instead of transformers' attention interface, so a prefix "
                f"cannot reach it; this family is not supported (docs/architectures.md lists the supported ones)")
        return observed

    def activate(self, state: PrefixState | None) -> None:
        self.state = state

    def deactivate(self) -> None:
        self.state = None

    # --- APT gates: computed from the input of the layer, pooled over source tokens -----------------
    def _gate_hook(self, module, args, kwargs):
        state = self.state
        if state is None or state.gate_fn is None:
            return None
        tag = module._prefix_tag
        if tag.site not in state.kv or (state.keep_gates and (tag.site, tag.layer) in state.gates):
            return None
        if tag.site == "encoder" or not self.is_encoder_decoder:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            if state.source_mask is None:
                raise ValueError("a gated prefix needs the source mask of the batch (PrefixState.source_mask)")
            mask = match_rows(state.source_mask, hidden.shape[0], "source mask")
            if mask.shape[1] != hidden.shape[1]:
                raise ValueError(
                    f"gate for {tag.site} layer {tag.layer} must be computed over the source "
                    f"({mask.shape[1]} tokens) but this call sees {hidden.shape[1]} tokens"
                )
            pooled = masked_mean(hidden, mask)
        else:  # decoder self / cross attention of an encoder-decoder: the source lives in the encoder
            if state.pooled_encoder is None:
                raise ValueError("gated decoder prefix of an encoder-decoder needs the encoder to run first")
            pooled = state.pooled_encoder
        state.gates[(tag.site, tag.layer)] = state.gate_fn(tag.site, tag.layer, pooled)
        return None

    def _encoder_hook(self, module, args, kwargs, output):
        state = self.state
        if state is None or state.gate_fn is None or state.pooled_encoder is not None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, T, d)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = state.source_mask if state.source_mask is not None else hidden.new_ones(hidden.shape[:2])
        state.pooled_encoder = masked_mean(hidden, match_rows(mask, hidden.shape[0], "source mask"))
        return None
