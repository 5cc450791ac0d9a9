"""The one cache folder that locally built backbones (tiny models, the converted SmolLM2) live in, and the
atomic publish every builder ends with. Light on purpose: the package root reads it for a config resolver."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def default_cache_dir() -> Path:
    """Where built backbones live: $PREFIXTUNING_CACHE, else ~/.cache/prefixtuning.

    train.py, evaluate.py, export.py, the serving CLI and `Backbone.load` all resolve it here, so a model
    is built once per machine, whichever command asks first."""
    env = os.environ.get("PREFIXTUNING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prefixtuning"


def publish_dir(tmp: Path, out: Path) -> Path:
    """Move a finished build into place atomically; concurrent builders (DDP ranks, sweep jobs) never
    see half a model, and the loser of a race throws its copy away."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "DONE").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
