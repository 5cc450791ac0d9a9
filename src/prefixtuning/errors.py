"""The one base class of the errors a user causes and can fix: a config value, a data file, a backbone that cannot
be found, a saved artifact for another model, a missing metric tool. Their message names the file, line or field
and says what to do, so the command-line entry points print it as one line and exit 1 instead of a traceback
(`exit_on_user_error`). Errors of the code itself stay ordinary exceptions with their traceback."""

from __future__ import annotations

import errno
import functools
import shutil
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from whoever runs the command; the message is the whole story."""


class MissingFile(UserError, FileNotFoundError):
    """A file the command was pointed at (a checkpoint, an export) does not exist."""


class WriteError(UserError, OSError):
    """A file could not be written (full disk, read-only folder, ...); names it, the cause and the free space."""


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def describe_failure(path: Path, err: OSError, kept: str = "", verb: str = "write") -> str:
    cause = err.strerror or str(err)
    where = f"{path}: {cause} (errno {err.errno})"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where += f"; {_free(path.parent)} free in {path.parent}"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where += f"; {path.parent} is not writable"
    return f"could not {verb} {where}; {kept or 'the previous version of the file (if any) is untouched'}"


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # only a write fails this way
DISK_ERRNOS = WRITE_ERRNOS + (errno.EACCES, errno.EPERM, errno.EIO)


def as_write_error(err: OSError, fallback: Path) -> OSError:
    """An OSError of the disk (full, read-only, quota, I/O) raised by any writer (a log appended, a library's
    own file) as a WriteError naming the file; other errors are returned unchanged."""
    if isinstance(err, UserError) or err.errno not in DISK_ERRNOS:
        return err
    return WriteError(describe_failure(Path(err.filename or fallback), err,
                                       kept="the checkpoints and files written before are untouched",
                                       verb="write" if err.errno in WRITE_ERRNOS else "access"))


def exit_on_user_error(fn):
    """Wrap an entry point: a UserError is printed as one line on stderr and the command exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as err:
            if not isinstance(err, UserError):  # a full disk / read-only folder hit by any writer: one sentence
                err = as_write_error(err, fallback=Path.cwd())
                if not isinstance(err, UserError):
                    raise
            line = f"error ({type(err).__name__}): {err}"
            # stderr only: a refused command (a changed resume, say) must leave the run folder byte-identical
            print(line, file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper
