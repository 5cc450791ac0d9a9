"""The one base class of the errors a user causes and can fix: a config value, a data file, a backbone that cannot
be found, a saved artifact for another model, a missing metric tool. Their message names the file, line or field
and says what to do, so the command-line entry points print it as one line and exit 1 instead of a traceback
(`exit_on_user_error`). Errors of the code itself stay ordinary exceptions with their traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from whoever runs the command; the message is the whole story."""


class MissingFile(UserError, FileNotFoundError):
    """A file the command was pointed at (a checkpoint, an export) does not exist."""


def exit_on_user_error(fn):
    """Wrap an entry point: a UserError is printed as one line on stderr and the command exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as err:
            if not isinstance(err, UserError):  # a full disk / read-only folder hit by any writer: one sentence
                from .atomic import as_write_error

                err = as_write_error(err, fallback=Path.cwd())
                if not isinstance(err, UserError):
                    raise
            line = f"error ({type(err).__name__}): {err}"
            # stderr only: a refused command (a changed resume, say) must leave the run folder byte-identical
            print(line, file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper
