"""Prefix initialization (Li & Liang 2021, Sec. 7.3 / Fig. 5).

random            the prefix module's own random initialization (static/APT: N(0, std^2)).
task_words        activations of real words: the frozen backbone runs on the words (e.g.
                  "table-to-text:"), and each layer's own keys/values at each attention site become
                  the prefix. For `reparam`, the embedding + MLP is fitted to produce them.
irrelevant_words  the same with words unrelated to the task ("elephant"), the paper's control.

The word tokens are repeated cyclically to fill P positions (then truncated), so any prefix length
can be initialized from any word list.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .backbone import Backbone
from .prefixes import Prefix
from .settings import FLOAT, STR, S

log = logging.getLogger(__name__)
# The `init.*` keys each kind reads besides `kind` (checked before any work by config_check).
INIT_SETTINGS = {"random": {"std": S(FLOAT, null=True, above=0)}, "task_words": {"text": S(STR)},
                 "irrelevant_words": {"text": S(STR)}}
INIT_KINDS = tuple(INIT_SETTINGS)


def tile_ids(ids: list[int], length: int) -> list[int]:
    if not ids:
        raise ValueError("the initialization text tokenizes to nothing")
    return (ids * (length // len(ids) + 1))[:length]


@torch.no_grad()
def word_activations(backbone: Backbone, text: str, length: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-site keys/values, each (n_layers, n_kv_heads, length, head_dim), of the backbone run on `text`."""
    ids = tile_ids(backbone.tokenizer(text, add_special_tokens=False)["input_ids"], length)
    x = torch.tensor([ids], device=next(backbone.model.parameters()).device)
    injector = backbone.injector
    saved_state, injector.state = injector.state, None
    injector.capture = {}
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        if backbone.is_encoder_decoder:
            backbone.model(input_ids=x, decoder_input_ids=x, use_cache=False)
        else:
            backbone.model(input_ids=x, use_cache=False)
        captured = injector.capture
    finally:
        injector.capture, injector.state = None, saved_state
        backbone.model.train(was_training)
    out = {}
    for site, g in backbone.geometry.sites.items():
        ks = [captured[(site, i)][0][0] for i in range(g.n_layers)]  # each (n_kv, P, hd)
        vs = [captured[(site, i)][1][0] for i in range(g.n_layers)]
        out[site] = (torch.stack(ks), torch.stack(vs))
    return out


def initialize_prefix(cfg, prefix: Prefix, backbone: Backbone) -> dict:
    """Apply `cfg.kind` to `prefix`; returns a small report (what was done, fit error for word inits)."""
    kind = cfg["kind"]
    if kind not in INIT_KINDS:
        raise ValueError(f"init.kind={kind!r} is not one of {', '.join(INIT_KINDS)}")
    if kind == "random":
        std = cfg.get("std")
        if std is not None:
            prefix.reset_random(float(std))  # static / apt; reparam keeps its own initialization
        return {"init": "random", "std": std}
    text = cfg["text"]
    if not prefix.positional:
        raise ValueError(f"init.kind={kind} fills prefix positions with the activations of words; a {prefix.kind} "
                         f"prefix has none (use init=random init.std=null: M = 0; or a small init.std)")
    target = word_activations(backbone, text, prefix.length)
    target = {s: target[s] for s in prefix.sites}
    errors = prefix.set_key_values(target)
    worst = max(errors.values())
    log.info("initialized the prefix from the activations of %r (max abs error %.2e)", text, worst)
    return {"init": kind, "text": text, "max_abs_error": worst}
