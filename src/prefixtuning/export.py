"""Writing exports: the inference prefix (or another method's trained tensors) of a trained model, in this
project's format or HF PEFT's. Reading them back is `loading.py`'s job; the file formats are `artifacts.py`'s.

A prefix export holds `prefix.safetensors` (per attention site `<site>.<name>` for every tensor the prefix kind
declares in `Prefix.exported`: keys and values, each (n_layers, n_kv_heads, P, head_dim), and APT's gates) and
`prefix.json` (format, backbone id, geometry, prefix kind and length, position convention, training config).
The reparameterization MLP is dropped: its output is what is saved. Other methods write `method.safetensors`
(their trainable tensors, named as in the model) and `method.json`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .artifacts import EXPORT_CHOICES, ExportError, write_export
from .config_check import check_export_config
from .loading import load_trained
from .methods import NoPrefixError
from .model import TunedModel
from .nlu.model import NLUModel
from .peft_interop import export_peft


def export_model(model: TunedModel, out_dir: str | Path, config: dict | None = None) -> Path:
    """What inference needs of `model` (its method's `export_payload`), with identity and run config;
    returns the weights file."""
    tensors, meta = model.method.export_payload(model)
    identity = model.identity()
    meta = {"backbone": identity["backbone"], "geometry": identity["geometry"], **meta, "config": config or {}}
    return write_export(out_dir, model.method.export_format, tensors, meta)


def export_from_config(cfg) -> Path:
    """export.py's entry: the config checked (types, unread keys) before the checkpoint is loaded."""
    check_export_config(cfg)
    return export_checkpoint(cfg.ckpt, cfg.out, cfg.get("format", "prefixtuning"))


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, format: str = "prefixtuning") -> Path:
    """Checkpoint of train.py -> export directory (this project's format, or HF PEFT's); prints the size."""
    if format not in EXPORT_CHOICES:
        raise ExportError(f"format={format!r} is not one of {', '.join(EXPORT_CHOICES)}")
    model, run_cfg = load_trained(ckpt)
    if isinstance(model, NLUModel):
        raise ExportError(f"{ckpt} is an NLU model (data={run_cfg.data.name}: a task head beside the method); exports "
                          f"hold a method's tensors for generation and serving, not a head. The checkpoint itself holds "
                          f"only the trained tensors: score it with `python evaluate.py ckpt={ckpt}`")
    if format == "peft":
        try:
            prefix = model.method.prefix_module()
        except NoPrefixError:
            raise ExportError(f"format=peft exports prefixes; {ckpt} was trained with method={model.method.kind}") from None
        path = export_peft(prefix, model.backbone, out_dir, model.shift_positions)
        print(f"[export] {path} (HF PEFT prefix tuning, P={prefix.length}; load with "
              f"PeftModel.from_pretrained(base_model, {out_dir!s}))", flush=True)
        return path
    path = export_model(model, out_dir, OmegaConf.to_container(run_cfg, resolve=True))
    print(f"[export] {path} ({path.stat().st_size / 1e6:.3f} MB, method={model.method.kind}: "
          f"{model.method.summary()}, backbone {model.backbone.name})", flush=True)
    return path


def export_prefix(prefix, backbone, out_dir: str | Path, shift_positions: bool = True,
                  config: dict | None = None) -> Path:
    """A bare prefix on `backbone` as a prefix export (the prefix method's `export_model`)."""
    return export_model(TunedModel(backbone, prefix, shift_positions), out_dir, config)
