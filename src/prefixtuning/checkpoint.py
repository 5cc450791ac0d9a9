"""Rebuild a trained PrefixTuningModel from a checkpoint of this project (no pickles executed)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lightning.pytorch.plugins.io import TorchCheckpointIO

from .factory import build_model, load_backbone
from .lightning_module import PrefixTuningModule, check_checkpoint
from .model import TunedModel


class RunFolderError(OSError):
    """The run folder cannot be written (read-only, full disk, not a folder); names the path and the cause."""


def check_writable(folder: Path) -> None:
    """Before any work: the run folder can be created and written to."""
    probe = Path(folder) / ".write_probe"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"the run folder {folder} cannot be written ({err.strerror or err}); choose another "
                             f"with hydra.run.dir=... or free the disk") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's writer (a temporary file moved into place, so an interrupted write never leaves half a
    checkpoint under the final name), with a failed write reported as what it is: the file, the cause
    (full disk, read-only folder) and that the checkpoints already written are untouched."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as err:
            folder = Path(path).parent
            kept = sorted(p.name for p in folder.glob("*.ckpt") if p != Path(path)) if folder.is_dir() else []
            raise RunFolderError(f"could not write checkpoint {path}: {err.strerror or err} (errno {err.errno}); "
                                 f"the checkpoints already written are untouched"
                                 f"{': ' + ', '.join(kept) if kept else ''}") from err


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, or a pickle that needs arbitrary code
        raise ValueError(f"cannot read checkpoint {path} safely (weights_only): {err}") from err


def load_trained(path: str | Path):
    """(TunedModel with the checkpoint's trained tensors, the run config it was trained with).

    `path` is a training checkpoint (.ckpt) or an export directory of export.py (a prefix export, or the
    trained tensors of another method)."""
    if Path(path).is_dir():
        return _load_export(Path(path))
    ckpt = read_checkpoint(path)
    if "prefixtuning" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'prefixtuning' entry)")
    cfg = OmegaConf.create(ckpt["prefixtuning"]["config"])
    model = build_model(cfg, load_backbone(cfg, trained_on=ckpt["prefixtuning"].get("backbone")))
    module = PrefixTuningModule(model, {"lr": 0.0})
    check_checkpoint(ckpt, module, source=str(path))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    return model.eval(), cfg


def _load_export(path: Path):
    from .export import ExportError, load_method_export, load_prefix, read_export

    if (path / "method.json").is_file():
        return load_method_export(path)
    meta, _ = read_export(path)
    if not meta.get("config"):
        raise ExportError(f"{path / 'prefix.json'} has no training config; evaluate needs its backbone and data")
    cfg = OmegaConf.create(meta["config"])
    backbone = load_backbone(cfg, trained_on=meta.get("backbone"))
    prefix, meta = load_prefix(path, backbone)
    return TunedModel(backbone, prefix, meta.get("shift_positions", True)).eval(), cfg
