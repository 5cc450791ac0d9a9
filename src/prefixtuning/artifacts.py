"""What a trained model leaves on disk, and the one identity check every reader applies.

Three kinds of file, none of them an untrusted pickle:

    checkpoint      train.py's .ckpt: Lightning's dict with the trainable tensors only, read with
                    `torch.load(weights_only=True)`; its "prefixtuning" entry names backbone, geometry, method
                    and the run config
    prefix export   prefix.safetensors + prefix.json (format prefixtuning-export/1): the inference prefix
                    (reparam's MLP dropped), servable by the prefix bank
    method export   method.safetensors + method.json (format prefixtuning-method/1): any other method's
                    trained tensors, named as in the model

This module knows the formats and nothing about models: `export.py` writes through it, `loading.py` reads
through it, and the Lightning module checks a resumed checkpoint with the same `check_identity`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import atomic
from .errors import MissingFile, UserError


class ExportError(UserError, ValueError):
    """An export directory (or a PEFT adapter) that cannot be written or read as asked."""


class IdentityMismatch(ExportError):
    """A checkpoint or export that belongs to another backbone, geometry or method."""


@dataclass(frozen=True)
class Format:
    tag: str  # the "format" field of the metadata
    weights: str  # safetensors file name
    meta: str  # JSON file name


PREFIX_EXPORT = Format("prefixtuning-export/1", "prefix.safetensors", "prefix.json")
METHOD_EXPORT = Format("prefixtuning-method/1", "method.safetensors", "method.json")
EXPORT_FORMATS = (PREFIX_EXPORT, METHOD_EXPORT)
# export.py's `format=`: this project's formats (above), or HF PEFT's prefix-tuning adapter (peft_interop.py)
EXPORT_CHOICES = ("prefixtuning", "peft")


def export_format(path: str | Path) -> Format:
    """Which export format the directory holds (by its metadata file); an error naming what is missing."""
    d = Path(path)
    for fmt in EXPORT_FORMATS:
        if (d / fmt.meta).is_file():
            return fmt
    names = " or ".join(f"{f.meta} + {f.weights}" for f in EXPORT_FORMATS)
    raise ExportError(f"{d} is not an export of this project (expected {names})")


def read_meta(file: Path, fmt: Format) -> dict:
    """An export's JSON metadata, checked to be valid JSON of format `fmt`."""
    try:
        meta = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt.tag:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{file} has format {got!r}, expected {fmt.tag!r}")
    return meta


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_export(path: str | Path, fmt: Format | None = None) -> tuple[Format, dict, dict[str, torch.Tensor]]:
    """(format, metadata, tensors) of an export directory; `fmt` demands one format."""
    d = Path(path)
    found = export_format(d)
    if fmt is not None and found != fmt:
        raise ExportError(f"{d} holds a {found.tag} export, not {fmt.tag}")
    meta = read_meta(d / found.meta, found)
    if not (d / found.weights).is_file():
        raise ExportError(f"{d} has {found.meta} but no {found.weights}")
    return found, meta, read_tensors(d / found.weights)


def write_export(out_dir: str | Path, fmt: Format, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors (detached, contiguous, on the CPU) and metadata; returns the weights file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the weights first, then the metadata that makes the folder an export: a kill in between leaves no
    # export that reads as complete with old weights
    atomic.write_bytes(out / fmt.weights, save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}))
    atomic.write_json(out / fmt.meta, {"format": fmt.tag, **meta})
    return out / fmt.weights


def read_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint, loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, or a pickle that needs arbitrary code
        raise ValueError(f"cannot read checkpoint {path} safely (weights_only): {err}") from err


def checkpoint_record(ckpt: dict, source: str) -> dict:
    """The identity and run config a checkpoint of this project carries."""
    record = ckpt.get("prefixtuning") if isinstance(ckpt, dict) else None
    if record is None:
        raise IdentityMismatch(f"{source} was not written by this project (no 'prefixtuning' entry)")
    return record


IDENTITY_FIELDS = ("backbone", "geometry", "method")


def check_identity(source: str, recorded: dict, current: dict, fields=IDENTITY_FIELDS) -> None:
    """The one identity check: what a checkpoint or export recorded equals the model it goes into."""
    if "task" in current or "task" in recorded:  # an NLU model: its task head (task, labels, pooling) too
        fields = (*fields, "task")
    for field in fields:
        if recorded.get(field) != current.get(field):
            raise IdentityMismatch(f"{source} was trained with {field} {recorded.get(field)!r}, "
                                   f"but this model has {current.get(field)!r}")


def check_tensor_names(source: str, got, expected, what: str) -> None:
    """A checkpoint or export holds exactly the tensors that train in `what`."""
    got, expected = set(got), set(expected)
    if got != expected:
        raise IdentityMismatch(f"{source} holds tensors that do not match {what} (missing: "
                               f"{sorted(expected - got)[:5]}, unexpected: {sorted(got - expected)[:5]})")


def trainable_keys(module) -> set[str]:
    """State-dict keys of the tensors that train: what checkpoints and exports hold, for every method."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def check_checkpoint(checkpoint: dict, module, source: str = "checkpoint") -> None:
    """Fail with a sentence when a checkpoint belongs to another backbone, method or geometry, or holds other
    tensors than the ones that train here."""
    check_identity(source, checkpoint_record(checkpoint, source), module.identity())
    check_tensor_names(source, checkpoint["state_dict"], trainable_keys(module), "this model's trainable tensors")
