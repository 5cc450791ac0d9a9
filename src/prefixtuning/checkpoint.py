"""Writing a run's checkpoints safely: the run folder is checked before any work, and a failed write names
the file and the cause. Reading them back is `loading.py`'s job."""

from __future__ import annotations

import atexit
import io
import json
import os
import socket
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from . import atomic
from .atomic import WriteError

# The run folder cannot be written (read-only, full disk, not a folder): one sentence with the path and the cause.
RunFolderError = WriteError


class RunLock:
    """One training process per run folder. `<folder>/.run.lock` names the holder (PID, host, start time);
    a second process gets one sentence naming it. A lock whose process is gone (killed, crashed) on this host
    is stale and taken over; a lock from another host is trusted (remove it by hand if that job is gone)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".run.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise RunFolderError(
                        f"the run folder {self.path.parent} is in use by PID {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('started')}): wait for it, stop it, or choose "
                        f"another hydra.run.dir") from None
                print(f"[run] taking over the stale lock {self.path} "
                      f"({'unreadable' if holder is None else 'PID %s is gone' % holder.get('pid')})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return
        raise RunFolderError(f"could not take the lock {self.path}: other processes keep taking it")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a folder that became read-only: the lock is stale now and taken over next time
                pass


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
    """Checkpoints written crash-safely (`atomic.py`): serialized in memory, written to a temporary file in the
    checkpoint's own folder, fsynced and renamed, so a kill or a full disk never leaves half a checkpoint under
    the final name and never destroys the previous one. (Lightning's own writer stages the file under /tmp and
    moves it, which across filesystems is a copy into the final name.) A failed write names the file, the cause,
    the free space and the checkpoints that are untouched. Remote paths (s3://, ...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        folder = path.parent
        kept = sorted(p.name for p in folder.glob("*.ckpt") if p != path) if folder.is_dir() else []
        atomic.write_bytes(path, buf.getvalue(), kept="the checkpoints already written are untouched"
                           + (": " + ", ".join(kept) if kept else ""))
