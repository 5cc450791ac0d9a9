"""Crash-safe writes: every file the project writes under a final name (checkpoints, exports, metrics.json,
config.yaml, predictions, reports, figures) goes to a temporary file in the same folder, is fsynced, and is
then renamed over the final name, and the folder itself is fsynced. A kill or a full disk at any moment leaves
either the previous file or the new one under that name, never a partial file, and a failed write removes its
temporary file. The temporary file lives in the same folder on purpose: a rename across filesystems is a
copy, and a copy that dies half-way destroys the previous file (what a temporary file under /tmp did to
last.ckpt).

A failed write is a `WriteError` (a RunFolderError): one sentence with the file, the cause and, for a full
disk, the free space left in its folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from .errors import WriteError, describe_failure

FAULT_HOOK = None  # set by prefixtuning.faults when a fault is injected (tests): called with the final path


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss after the rename keeps the new name)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, kept: str = ""):
    """Yield a temporary path in `path`'s folder; write the file there (any writer: safetensors, savefig,
    torch.save). On success it is fsynced and renamed over `path`; on any failure it is removed and `path` is
    untouched. OSError becomes WriteError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if FAULT_HOOK is not None:
            FAULT_HOOK(path, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise WriteError(describe_failure(path, err, kept)) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def is_temporary(path: Path) -> bool:
    name = Path(path).name
    stem, _, pid = name.rpartition(".tmp")
    return name.startswith(".") and bool(stem) and pid.isdigit()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files left in `folder` by a process that was killed while writing (`kill -9` cannot clean
    up): removed when the next command takes the folder (under its lock). Files of a live process are kept."""
    removed = []
    for p in Path(folder).glob(".*.tmp*") if Path(folder).is_dir() else []:
        if not is_temporary(p):
            continue
        pid = int(p.name.rpartition(".tmp")[2])
        try:
            os.kill(pid, 0)
            continue  # that process is alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def write_bytes(path: str | Path, data: bytes, kept: str = "") -> Path:
    with atomic_path(path, kept) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, kept: str = "") -> Path:
    return write_bytes(path, text.encode("utf-8"), kept)


def write_json(path: str | Path, obj, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", str)
    return write_text(path, json.dumps(obj, **kwargs))


def write_lines(path: str | Path, rows) -> Path:
    """Rows of text (each without its newline), one per line."""
    buf = io.StringIO()
    for row in rows:
        buf.write(row + "\n")
    return write_text(path, buf.getvalue())
