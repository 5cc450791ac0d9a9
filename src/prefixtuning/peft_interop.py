"""HF PEFT prefix-tuning format, both ways, for decoder-only backbones.

    python export.py ckpt=<checkpoint> out=<dir> format=peft     # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(base_model, dir)                    # logits equal to ours, greedy token-equal
    load_peft_prefix(dir, backbone)                               # a PEFT adapter as this project's prefix
    (the prefix bank and the serving CLI load such a directory directly)

PEFT keeps the prefix in the key/value cache, so its real tokens start at position P: only prefixes trained
with `prefix.shift_positions=true` (the default) equal PEFT's. PEFT's tensor is `prompt_embeddings` of shape
(P, n_layers * 2 * n_kv_heads * head_dim), viewed as (P, layer, key|value, kv head, head_dim). Static and
reparam prefixes export (reparam as its computed prefix); APT's gates and PrefixMemory's memory have no PEFT
counterpart; PEFT's
`prefix_projection=true` adapters hold an MLP, not the prefix, and are refused on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import atomic
from .artifacts import ExportError
from .prefixes import Prefix
from .prefixes.static import StaticPrefix

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def export_peft(prefix: Prefix, backbone, out_dir: str | Path, shift_positions: bool = True) -> Path:
    if backbone.is_encoder_decoder:
        raise ExportError("PEFT's prefix tuning of an encoder-decoder prefixes the decoder only; this prefix also "
                          "has encoder and cross-attention parts, so it has no PEFT equivalent")
    if not prefix.positional:
        raise ExportError(f"a {prefix.kind} prefix is read outside the softmax (PrefixMemory-Tuning) and PEFT's prefix "
                          f"tuning has no counterpart; export format=prefixtuning")
    if not shift_positions:
        raise ExportError("PEFT puts the prefix in the cache, so real tokens start at position P; this prefix was "
                          "trained with prefix.shift_positions=false and would not give the same outputs")
    served = prefix.inference()
    if served.gated:
        raise ExportError("APT's token gates and layer scales have no PEFT counterpart; export format=prefixtuning")
    k, v = served.key_values()["decoder"]  # (L, 1, H_kv, P, hd)
    if k.shape[-1] != v.shape[-1]:
        raise ExportError(f"PEFT's prefix holds keys and values of one size; this backbone has keys of {k.shape[-1]} "
                          f"and values of {v.shape[-1]} per head: export format=prefixtuning")
    L, _, H, P, hd = k.shape
    emb = torch.stack([k[:, 0], v[:, 0]], dim=1).permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * hd)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / WEIGHTS, save({"prompt_embeddings": emb.detach().float().contiguous().cpu()}))
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
              "token_dim": H * hd, "num_attention_heads": H, "num_layers": L,
              "encoder_hidden_size": backbone.geometry.hidden_size, "prefix_projection": False,
              "num_transformer_submodules": 1, "inference_mode": True,
              "base_model_name_or_path": str(backbone.model.name_or_path), "revision": None}
    atomic.write_json(out / CONFIG, config)
    return out / WEIGHTS


def _hub_id(name) -> bool:
    """A hub id such as `gpt2-medium` or `org/model` (not a local path, not a local backbone's build folder)."""
    return isinstance(name, str) and bool(name) and not name.startswith(("/", ".", "~")) and name.count("/") <= 1 \
        and not Path(name).exists()


def load_peft_prefix(path: str | Path, backbone) -> tuple[StaticPrefix, dict]:
    """(static prefix, metadata) from a PEFT prefix-tuning adapter directory, checked against `backbone`."""
    d = Path(path)
    try:
        cfg = json.loads((d / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{d / CONFIG}: not a readable PEFT adapter config ({err})") from None
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ExportError(f"{d / CONFIG}: peft_type {cfg.get('peft_type')!r}, only PREFIX_TUNING is a prefix")
    if cfg.get("prefix_projection"):
        raise ExportError(f"{d / CONFIG}: prefix_projection=true stores an MLP, not the prefix; compute the prefix "
                          f"with PEFT and save it with prefix_projection=false")
    if backbone.is_encoder_decoder:
        raise ExportError("importing a PEFT prefix is supported for decoder-only backbones")
    declared = cfg.get("base_model_name_or_path")
    if _hub_id(declared) and _hub_id(backbone.name) and declared != backbone.name:
        raise ExportError(f"{d / CONFIG}: the adapter was trained on {declared}, not on backbone {backbone.name} "
                          f"(base_model_name_or_path); load it on its own base")
    g = backbone.geometry.sites["decoder"]
    if g.value_dim is not None:
        raise ExportError(f"{d}: PEFT's prefix holds keys and values of one size; backbone {backbone.name} has keys "
                          f"of {g.head_dim} and values of {g.value_dim} per head")
    want = {"num_layers": g.n_layers, "num_attention_heads": g.n_kv_heads, "token_dim": g.n_kv_heads * g.head_dim}
    bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
    if bad:
        raise ExportError(f"{d}: adapter geometry {', '.join(f'{k}={a} (backbone {b})' for k, (a, b) in bad.items())} "
                          f"does not match backbone {backbone.name}")
    try:
        emb = load_file(str(d / WEIGHTS))["prompt_embeddings"]
    except (OSError, KeyError, RuntimeError, SafetensorError) as err:  # missing, truncated or not safetensors
        raise ExportError(f"{d / WEIGHTS}: no readable prompt_embeddings ({err})") from None
    P = int(cfg["num_virtual_tokens"])
    if emb.shape != (P, g.n_layers * 2 * g.n_kv_heads * g.head_dim):
        raise ExportError(f"{d / WEIGHTS}: prompt_embeddings has shape {tuple(emb.shape)}, expected "
                          f"({P}, {g.n_layers * 2 * g.n_kv_heads * g.head_dim})")
    kv = emb.view(P, g.n_layers, 2, g.n_kv_heads, g.head_dim).permute(2, 1, 3, 0, 4)  # (2, L, H, P, hd)
    prefix = StaticPrefix(backbone.geometry, P)
    prefix.set_key_values({"decoder": (kv[0], kv[1])})
    device = next(backbone.model.parameters()).device
    return prefix.to(device).eval(), {"kind": "static", "length": P, "shift_positions": True, "source": "peft"}
