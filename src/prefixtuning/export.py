"""Export the inference prefix of a trained checkpoint, and load it back onto a backbone.

An export directory holds `prefix.safetensors` (per attention site: `<site>.keys` and `<site>.values`,
each (n_layers, n_kv_heads, P, head_dim); APT adds `<site>.gate_weight`, `<site>.gate_bias`,
`<site>.layer_scale`) and `prefix.json` (format, backbone id, geometry, prefix kind and length, position
convention, training config). The reparameterization MLP is dropped: its output is what is saved.
Loading checks the backbone and its geometry and fails with a sentence naming the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone, Geometry
from .prefixes import Prefix
from .prefixes.apt import APTPrefix
from .prefixes.static import StaticPrefix

FORMAT = "prefixtuning-export/1"
WEIGHTS, META = "prefix.safetensors", "prefix.json"


class ExportError(ValueError):
    pass


def inference_prefix(prefix: Prefix) -> Prefix:
    """The prefix as served: reparam -> static (MLP dropped); static and APT unchanged."""
    return prefix.to_static() if hasattr(prefix, "to_static") else prefix


def export_prefix(prefix: Prefix, backbone: Backbone, out_dir: str | Path, shift_positions: bool = True,
                  config: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    served = inference_prefix(prefix)
    tensors = {}
    for site in served.sites:
        tensors[f"{site}.keys"] = served.keys[site].detach().contiguous().cpu()
        tensors[f"{site}.values"] = served.values[site].detach().contiguous().cpu()
        if isinstance(served, APTPrefix):
            tensors[f"{site}.gate_weight"] = served.gate_weight[site].detach().contiguous().cpu()
            tensors[f"{site}.gate_bias"] = served.gate_bias[site].detach().contiguous().cpu()
            tensors[f"{site}.layer_scale"] = served.layer_scale[site].detach().contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS))
    meta = {"format": FORMAT, "backbone": backbone.name, "geometry": backbone.geometry.to_dict(),
            "kind": served.kind, "trained_kind": prefix.kind, "length": served.length, "sites": served.sites,
            "shift_positions": bool(shift_positions), "dtype": str(next(iter(tensors.values())).dtype),
            "config": config or {}}
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    return out / WEIGHTS


def _read_meta(file: Path, fmt: str) -> dict:
    """An export's JSON metadata, checked to be valid JSON of format `fmt`."""
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{file} is not valid JSON ({err})") from None
    if meta.get("format") != fmt:
        raise ExportError(f"{file} has format {meta.get('format')!r}, expected {fmt!r}")
    return meta


def read_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(path)
    if (d / METHOD_META).is_file():
        meta = _read_meta(d / METHOD_META, METHOD_FORMAT)
        raise ExportError(f"{d} holds a method={meta.get('method', {}).get('kind')} export, not a prefix: mixed-prefix "
                          f"batching (the prefix bank, serving) injects per-row prefixes and serves prefix exports "
                          f"only; load this one with evaluate.py ckpt={d} or checkpoint.load_trained")
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise ExportError(f"{d} is not a prefix export (expected {META} and {WEIGHTS})")
    meta = _read_meta(d / META, FORMAT)
    try:
        tensors = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportError(f"{d / WEIGHTS} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return meta, tensors


def load_prefix(path: str | Path, backbone: Backbone) -> tuple[Prefix, dict]:
    """(Prefix module ready for inference on `backbone`, export metadata). Refuses another backbone."""
    meta, tensors = read_export(path)
    if meta["backbone"] != backbone.name:
        raise ExportError(f"prefix {path} was trained on backbone {meta['backbone']!r}, not {backbone.name!r}")
    geo = Geometry.from_dict(meta["geometry"])
    if geo != backbone.geometry:
        raise ExportError(f"prefix {path} was exported for geometry {geo.to_dict()} but backbone {backbone.name} "
                          f"has {backbone.geometry.to_dict()}")
    cls = {"static": StaticPrefix, "apt": APTPrefix}.get(meta["kind"])
    if cls is None:
        raise ExportError(f"{path}: unknown exported prefix kind {meta['kind']!r}")
    prefix = cls(backbone.geometry, meta["length"], meta["sites"])
    state = {}
    for site in meta["sites"]:
        state[f"keys.{site}"] = tensors[f"{site}.keys"]
        state[f"values.{site}"] = tensors[f"{site}.values"]
        if cls is APTPrefix:
            state[f"gate_weight.{site}"] = tensors[f"{site}.gate_weight"]
            state[f"gate_bias.{site}"] = tensors[f"{site}.gate_bias"]
            state[f"layer_scale.{site}"] = tensors[f"{site}.layer_scale"]
    try:
        prefix.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}: tensors do not match the declared geometry: {err}") from None
    device = next(backbone.model.parameters()).device
    return prefix.to(device).eval(), meta


METHOD_FORMAT = "prefixtuning-method/1"
METHOD_WEIGHTS, METHOD_META = "method.safetensors", "method.json"


def export_method(model, out_dir: str | Path, config: dict | None = None) -> Path:
    """Any method but prefix: its trained tensors (named as in the model) + metadata. For finetune that is
    every backbone weight; for adapters, LoRA and prompts only theirs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out / METHOD_WEIGHTS))
    bb = model.backbone
    meta = {"format": METHOD_FORMAT, "backbone": bb.name, "geometry": bb.geometry.to_dict(),
            "method": model.method.describe(), "tensors": len(tensors), "config": config or {}}
    (out / METHOD_META).write_text(json.dumps(meta, indent=2, default=str))
    return out / METHOD_WEIGHTS


def load_method_export(path: str | Path):
    """(model with the exported tensors, run config) of an export_method directory."""
    from omegaconf import OmegaConf

    from .factory import build_model, load_backbone

    d = Path(path)
    meta = _read_meta(d / METHOD_META, METHOD_FORMAT)
    if not meta.get("config"):
        raise ExportError(f"{d / METHOD_META} has no training config; loading needs its backbone and method")
    cfg = OmegaConf.create(meta["config"])
    model = build_model(cfg, load_backbone(cfg, trained_on=meta["backbone"]))
    if model.backbone.name != meta["backbone"] or model.backbone.geometry.to_dict() != meta["geometry"]:
        raise ExportError(f"{d} was exported for backbone {meta['backbone']!r}, not {model.backbone.name!r}")
    try:
        tensors = load_file(str(d / METHOD_WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportError(f"{d / METHOD_WEIGHTS} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise ExportError(f"{d / METHOD_WEIGHTS} holds tensors that do not match method {meta['method']} "
                          f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model.eval(), cfg


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, format: str = "prefixtuning") -> Path:
    """Checkpoint of train.py -> export directory (this project's format, or HF PEFT's); prints the size."""
    from .checkpoint import load_trained
    from omegaconf import OmegaConf

    if format not in ("prefixtuning", "peft"):
        raise ExportError(f"format={format!r} is not one of prefixtuning, peft")
    model, run_cfg = load_trained(ckpt)
    if format == "peft":
        if not hasattr(model.method, "prefix"):
            raise ExportError(f"format=peft exports prefixes; {ckpt} was trained with method={model.method.kind}")
        from .peft_interop import export_peft

        path = export_peft(model.prefix, model.backbone, out_dir, model.shift_positions)
        print(f"[export] {path} (HF PEFT prefix tuning, P={model.prefix.length}; load with "
              f"PeftModel.from_pretrained(base_model, {out_dir!s}))", flush=True)
        return path
    path = model.method.export(model, out_dir, OmegaConf.to_container(run_cfg, resolve=True))
    print(f"[export] {path} ({path.stat().st_size / 1e6:.3f} MB, method={model.method.kind}: "
          f"{model.method.summary()}, backbone {model.backbone.name})", flush=True)
    return path
