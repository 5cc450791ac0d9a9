"""Resuming a run: either exactly the run that was interrupted, or refused before anything is touched.

    python train.py hydra.run.dir=<run folder> ckpt_path=last

- The run's own settings are restored: `resume_argv` puts the original command's overrides (the run's
  `.hydra/overrides.yaml`) back in front of the new ones, and tells Hydra not to rewrite `.hydra/`.
- `check_resume` compares the composed config with the config stored inside the checkpoint and refuses a
  difference (or, with `resume_allow_changes=true`, resumes with a loud warning listing it).
- `ckpt_path=last` with no checkpoint, a missing file or a corrupt one is an error; for a corrupt one the
  newest checkpoint that does load is offered.
All of this runs before the run folder is written to, so a refused command leaves it byte-identical.
Logs continue: metrics.jsonl and the CSV log are appended to (`ContinuingCSVLogger`), never truncated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import OmegaConf

from .errors import UserError

# keys that may differ between the interrupted command and the resuming one
IGNORED = ("ckpt_path", "resume_allow_changes", "sweep_resume", "paths", "hydra")


class ResumeError(UserError, RuntimeError):
    """A resume that cannot be exact; raised before the run folder is touched."""


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def read_resume_checkpoint(ck: str, output_dir: Path) -> tuple[Path, dict]:
    """(path, contents) of the checkpoint to resume: it exists and loads safely, or ResumeError says what is
    wrong and which checkpoint does load."""
    folder = output_dir / "checkpoints"
    path = folder / "last.ckpt" if ck == "last" else Path(ck)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        where = (f"{folder} holds {', '.join(found)}" if found else f"{folder} holds no checkpoint"
                 if folder.is_dir() else f"{output_dir} has no checkpoints/ folder")
        raise ResumeError(f"ckpt_path={ck}: {path} does not exist ({where}); nothing to resume. Point "
                          f"hydra.run.dir at the run folder, or drop ckpt_path to start a new run")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
        good = [p for p in others if _loads(p)]
        offer = (f"the newest checkpoint that loads is {good[-1]}: resume with ckpt_path={good[-1]}" if good
                 else f"no other checkpoint in {path.parent} loads")
        raise ResumeError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {offer}") from None


def checkpoint_to_resume(cfg, output_dir: Path) -> Path | None:
    """The checkpoint `cfg.ckpt_path` names (`last` = this run folder's last.ckpt), checked to exist, to load
    safely and to belong to a run with the same settings. None when not resuming."""
    ck = cfg.get("ckpt_path")
    if ck in (None, "", "null"):
        return None
    path, ckpt = read_resume_checkpoint(str(ck), Path(output_dir))
    saved = (ckpt.get("prefixtuning") or {}).get("config")
    if saved is None:
        raise ResumeError(f"{path} was not written by this project's train.py (no stored run config)")
    diffs = config_diff(saved, OmegaConf.to_container(cfg, resolve=True))
    if diffs:
        lines = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diffs[:12])
        more = f" (and {len(diffs) - 12} more)" if len(diffs) > 12 else ""
        if not cfg.get("resume_allow_changes"):
            raise ResumeError(f"resuming {path} with settings that differ from the run's own: {lines}{more}. "
                              f"Resume with the run's settings (`python train.py hydra.run.dir=<run> "
                              f"ckpt_path=last` restores them), or add resume_allow_changes=true to continue "
                              f"with the new ones")
        print(f"[resume] WARNING: resume_allow_changes=true: continuing {path} with settings that differ from "
              f"the run's own: {lines}{more}", flush=True)
    return path


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(saved) | set(now)):
        key = f"{prefix}{k}"
        if key in IGNORED:
            continue
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b:
            out.append((key, a, b))
    return out


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def resume_argv(argv: list[str]) -> list[str]:
    """For `train.py ... ckpt_path=...`: the original command's overrides, then the new ones (a new value of
    the same key replaces the old one, and is then checked by `checkpoint_to_resume`), and no rewrite of
    the run's `.hydra/`. Other commands are returned unchanged."""
    args = argv[1:]
    kv = {_override_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    ck = kv.get("ckpt_path")
    if ck in (None, "", "null") or "-m" in args or "--multirun" in args:
        return argv
    run_dir = kv.get("hydra.run.dir")
    if run_dir is None and ck != "last" and Path(ck).parent.name == "checkpoints":
        run_dir = str(Path(ck).parent.parent)
        args = args + [f"hydra.run.dir={run_dir}"]
    if run_dir is None:
        raise ResumeError("ckpt_path=last needs the run folder: add hydra.run.dir=<logs/train/runs/...>")
    read_resume_checkpoint(ck, Path(run_dir))  # before Hydra creates anything in the folder
    saved_file = Path(run_dir) / ".hydra" / "overrides.yaml"
    saved = [str(o) for o in OmegaConf.load(saved_file)] if saved_file.is_file() else []
    new_keys = {_override_key(a) for a in args if "=" in a}
    keep = [o for o in saved if _override_key(o) not in new_keys | {"hydra.run.dir", "hydra.output_subdir"}]
    return [argv[0], *keep, *args, "hydra.output_subdir=null"]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and appends."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                header = fh.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class ContinuingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
