"""Writing a run's checkpoints safely: the run folder is checked before any work, and a failed write names
the file and the cause. Reading them back is `loading.py`'s job."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import UserError


class RunFolderError(UserError, OSError):
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
