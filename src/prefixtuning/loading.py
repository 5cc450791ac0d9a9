"""Turning what training left on disk into a model: the one loader behind evaluate, export, the Python API,
serving, the gate probe and PEFT interop.

    load_trained(path)              a checkpoint (.ckpt) or an export directory -> (TunedModel, run config)
    load_prefix(path, backbone)     a prefix export or an HF PEFT prefix-tuning adapter -> (Prefix, metadata)

Every path goes through `artifacts.check_identity` (backbone, geometry and, for checkpoints, the method), and
each method and prefix kind rebuilds itself from the tensors it declared (`Method.from_export` / `restore`,
`Prefix.from_export`), so a new kind or method adds no branch here.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .artifacts import (METHOD_EXPORT, PREFIX_EXPORT, ExportError, check_identity, check_tensor_names,
                        checkpoint_record, read_checkpoint, read_export, read_meta)
from .backbone import Backbone
from .factory import build_model, load_backbone, method_config, prefix_config
from .methods import METHODS
from .methods.prefix import load_exported_prefix
from .model import TunedModel
from .peft_interop import is_peft_dir, load_peft_prefix
from .prefixes import Prefix


def load_trained(path: str | Path) -> tuple[TunedModel, object]:
    """(TunedModel with the trained tensors, in eval mode; the run config it was trained with).

    `path` is a training checkpoint (.ckpt) or an export directory (a prefix export, or another method's)."""
    path = Path(path)
    model, cfg = _from_export(path) if path.is_dir() else _from_checkpoint(path)
    return model.eval(), cfg


def _from_checkpoint(path: Path):
    ckpt = read_checkpoint(path)
    record = checkpoint_record(ckpt, str(path))
    cfg = OmegaConf.create(record["config"])
    model = build_model(cfg, load_backbone(cfg, trained_on=record.get("backbone")))
    check_identity(str(path), record, model.identity())
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    check_tensor_names(str(path), state, [n for n, p in model.named_parameters() if p.requires_grad],
                       "this model's trainable tensors")
    model.load_state_dict(state, strict=False)
    return model, cfg


def _from_export(path: Path):
    fmt, meta, tensors = read_export(path)
    if not meta.get("config"):
        raise ExportError(f"{path / fmt.meta} has no training config; loading needs its backbone, data and method")
    cfg = OmegaConf.create(meta["config"])
    backbone = load_backbone(cfg, trained_on=meta.get("backbone"))
    check_identity(str(path), meta, backbone.identity(), fields=("backbone", "geometry"))
    kind = "prefix" if fmt == PREFIX_EXPORT else meta.get("method", {}).get("kind")
    if kind not in METHODS:
        raise ExportError(f"{path / fmt.meta}: method {kind!r} is not one of {', '.join(sorted(METHODS))}")
    try:
        method = METHODS[kind].from_export(backbone, method_config(cfg), prefix_config(cfg), meta, tensors,
                                           str(path / fmt.weights))
    except ValueError as err:
        raise ExportError(str(err)) from None
    model = TunedModel(backbone, method)
    method.restore(model, tensors, str(path / fmt.weights))
    return model, cfg


def load_prefix(path: str | Path, backbone: Backbone) -> tuple[Prefix, dict]:
    """(prefix ready for inference on `backbone`, its metadata) from a prefix export of this project or an HF
    PEFT prefix-tuning adapter; another backbone or geometry is refused with a sentence."""
    if is_peft_dir(path):
        return load_peft_prefix(path, backbone)
    d = Path(path)
    try:
        _, meta, tensors = read_export(d, PREFIX_EXPORT)
    except ExportError as err:
        if (d / METHOD_EXPORT.meta).is_file():
            raise ExportError(f"{d} holds a method={_method_kind(d)} export, not a prefix: mixed-prefix batching "
                              f"(the prefix bank, serving) injects per-row prefixes and serves prefix exports only; "
                              f"load this one with evaluate.py ckpt={d} or loading.load_trained") from None
        raise err
    check_identity(str(d), meta, backbone.identity(), fields=("backbone", "geometry"))
    try:
        prefix = load_exported_prefix(backbone.geometry, meta, tensors, str(d / PREFIX_EXPORT.weights))
    except ValueError as err:
        raise ExportError(str(err)) from None
    device = next(backbone.model.parameters()).device
    return prefix.to(device).eval(), meta


def _method_kind(d: Path):
    try:
        return read_meta(d / METHOD_EXPORT.meta, METHOD_EXPORT).get("method", {}).get("kind")
    except ExportError:
        return "?"
