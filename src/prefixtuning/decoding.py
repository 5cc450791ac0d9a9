"""Batched decoding with the prefix, as the paper decodes.

Table-to-text: beam 5, at least 5 and at most 100 new tokens, no newline tokens. XSUM: beam 6, length
penalty 0.8, 11 to 62 new tokens. Decoder-only prompts are left-padded; outputs come back in input order.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .faults import fire_if
from .model import PrefixTuningModel


@lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> tuple[int, ...]:
    ids = []
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]) or "\r" in tokenizer.decode([i]):
            ids.append(i)
    return tuple(ids)


def generate_kwargs(cfg, tokenizer) -> dict:
    kw = {"num_beams": int(cfg.num_beams), "max_new_tokens": int(cfg.max_new_tokens),
          "min_new_tokens": int(cfg.min_new_tokens), "length_penalty": float(cfg.length_penalty),
          "do_sample": False, "early_stopping": bool(cfg.get("early_stopping", True)) if cfg.num_beams > 1 else False,
          "no_repeat_ngram_size": int(cfg.get("no_repeat_ngram_size", 0) or 0),
          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if cfg.get("no_newlines"):
        kw["suppress_tokens"] = list(_newline_ids(tokenizer))
    if kw["num_beams"] == 1:
        kw.pop("length_penalty")
        kw.pop("early_stopping")
    return kw


def check_generation_positions(model: PrefixTuningModel, longest_prompt: int, max_new_tokens: int) -> None:
    geo, enc_dec = model.backbone.geometry, model.backbone.is_encoder_decoder
    taken = 0 if enc_dec else model.method.positions_taken(model.backbone)
    need = taken + (0 if enc_dec else longest_prompt) + max_new_tokens
    if not geo.fits(need):
        raise ValueError(f"decoding needs {need} positions ({model.method.summary()}: {taken} + longest prompt "
                         f"{longest_prompt} + max_new_tokens {max_new_tokens}) but backbone "
                         f"{model.backbone.name} has {geo.max_positions}")


def pad_prompts(prompts: Sequence[list[int]], pad_id: int, is_encoder_decoder: bool) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask) of token-id prompts: left-padded for a decoder-only model, so generation
    continues from each row's last real token; right-padded as encoder input for an encoder-decoder."""
    n = max(map(len, prompts))
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for r, p in enumerate(prompts):
        span = slice(0, len(p)) if is_encoder_decoder else slice(n - len(p), n)
        ids[r, span], mask[r, span] = torch.tensor(p, dtype=torch.long), 1
    return ids, mask


def place_rows(store: dict, batch: dict, idx: list[int], n: int) -> None:
    """Put a sorted batch's per-row tensors (key -> (len(idx), ...)) at their input positions in `store`
    (key -> (n, ...)): batching sorts inputs by length, callers get them back in their own order."""
    for key, t in batch.items():
        store.setdefault(key, t.new_empty(n, *t.shape[1:]))[torch.tensor(idx, device=t.device)] = t


@torch.no_grad()
def decode(model: PrefixTuningModel, prompts: Sequence[list[int]], cfg, batch_size: int = 16,
           progress: bool = True, desc: str = "decoding", fault_point: str | None = None) -> list[str]:
    """Token-id prompts (from Featurizer.prompt_ids) -> decoded strings, one per prompt, in order.
    `fault_point` names this decode for fault injection (faults.py) after each batch."""
    tok = model.backbone.tokenizer
    kw = generate_kwargs(cfg, tok)
    if prompts:
        check_generation_positions(model, max(map(len, prompts)), kw["max_new_tokens"])
    was_training = model.training
    model.eval()
    device = next(model.backbone.model.parameters()).device
    # longest first: batches of similar length waste less padding; results are put back in order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    gated = model.method.gated
    gates: dict = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_prompts([prompts[i] for i in idx], tok.pad_token_id, model.backbone.is_encoder_decoder)
        gen = model.generate(ids.to(device), mask.to(device), **kw)
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r], skip_special_tokens=True).strip()
        if gated:  # put each example's gates back at its input position
            place_rows(gates, model.prefix.last_token_gates, idx, len(prompts))
        bar.update(len(idx))
        if fault_point:
            fire_if(fault_point)
    bar.close()
    if gated:  # the gates left on the model are those of every input, in the caller's order
        model.prefix.last_token_gates = gates
    model.train(was_training)
    return out
