"""Resuming a run: either exactly the run that was interrupted, or refused before anything is touched.

    python train.py hydra.run.dir=<run folder> ckpt_path=last   # continue this run, whatever stopped it
    python train.py ... hydra.run.dir=<run folder> ckpt_path=auto  # a job script: start, or continue

A run folder is in one of four states (`folder_state`): new (nothing of a run), started (stopped before its
first checkpoint), interrupted (checkpoints, no metrics.json) or finished (metrics.json). `plan_run` decides
what a command does with it, before anything is written:
- no ckpt_path: a new run; a started one is begun again (its files set aside in `attempt<k>/`); a folder
  holding checkpoints or a finished run is refused (it would be overwritten);
- ckpt_path=last: a started run begins again, an interrupted one continues from checkpoints/last.ckpt, a
  finished one is left as it is and its metrics returned (unless resume_allow_changes=true continues it
  with new settings); `auto` does the same and also starts a new run;
- `sweep_resume=true` on a multirun means `ckpt_path=auto` for every job.

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

INTERRUPTED = "interrupted.json"  # written when a signal stopped the run; removed when it finishes
PARTIAL = ".metrics.partial.json"  # the metrics known before and after fit, for a resume that finishes the run
HISTORY = "history.jsonl"  # one line per command that trained in this folder (the report marks re-runs)

# how a command ran, not what it trains: a sweep re-run with sweep_resume=true holds the same cells (the report
# does not count these as swept settings)
OPERATIONAL = ("ckpt_path", "resume_allow_changes", "sweep_resume")
# keys that may differ between the interrupted command and the resuming one
IGNORED = (*OPERATIONAL, "paths", "hydra")


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


def folder_state(run: Path) -> str:
    """'new', 'started' (stopped before its first checkpoint), 'interrupted' or 'finished'."""
    run = Path(run)
    ck = run / "checkpoints"
    if (run / "metrics.json").is_file() and not (run / INTERRUPTED).exists():
        return "finished"
    if ck.is_dir() and any(ck.glob("*.ckpt")):
        return "interrupted"
    if any((run / f).exists() for f in ("config.yaml", "metrics.jsonl", INTERRUPTED, PARTIAL)):
        return "started"
    return "new"


def _none(ck) -> bool:
    return ck in (None, "", "null")


def plan_run(cfg, output_dir: Path) -> tuple[str, Path | None]:
    """(mode, checkpoint) for this command in `output_dir`, decided before anything is written: mode is
    'new', 'restart' (a run stopped before its first checkpoint, begun again), 'resume' or 'finished'."""
    run = Path(output_dir)
    ck = cfg.get("ckpt_path")
    if cfg.get("sweep_resume") and _none(ck):
        ck = "auto"
    state = folder_state(run)
    if _none(ck):
        if state in ("interrupted", "finished"):
            what = ("a finished run (metrics.json)" if state == "finished" else
                    "an unfinished run with checkpoints")
            raise ResumeError(f"the run folder {run} holds {what}; a new run there would overwrite it. Continue it "
                              f"with `python train.py hydra.run.dir={run} ckpt_path=last`, or choose another "
                              f"hydra.run.dir")
        return ("restart" if state == "started" else "new"), None
    ck = str(ck)
    if ck == "auto" and state == "new":
        return "new", None
    if ck in ("last", "auto") and state == "started":
        return "restart", None
    if ck == "auto":
        ck = "last"
    if state == "finished" and ck == "last" and not (run / "checkpoints" / "last.ckpt").is_file():
        _check_finished_config(cfg, run)  # its checkpoints were deleted: the settings are compared with config.yaml
        return "finished", None
    path, changed = checkpoint_to_resume(cfg, run, ck)
    if state == "finished" and ck == "last" and not changed:
        return "finished", path
    return "resume", path


def _check_finished_config(cfg, run: Path) -> None:
    saved = run / "config.yaml"
    if not saved.is_file():
        return
    diffs = config_diff(OmegaConf.to_container(OmegaConf.load(saved), resolve=True),
                        OmegaConf.to_container(cfg, resolve=True))
    if diffs:
        k, a, b = diffs[0]
        raise ResumeError(f"{run} holds a finished run with other settings ({k}: {a!r} there, {b!r} now) and no "
                          f"checkpoint to continue from; choose another hydra.run.dir (or hydra.sweep.dir)")


def set_aside(run: Path) -> Path | None:
    """A run stopped before its first checkpoint is begun again: the files of that attempt (logs, partial
    outputs) move to `attempt<k>/`, so nothing is lost and the new attempt's logs start clean. Hydra's
    `.hydra/`, the run's log file and history.jsonl stay."""
    keep = {".hydra", HISTORY, ".run.lock"}
    items = [p for p in run.iterdir() if p.name not in keep and not p.name.startswith("attempt")
             and p.suffix != ".log"] if run.is_dir() else []
    if not items:
        return None
    k = 1 + max([int(p.name[7:]) for p in run.glob("attempt*") if p.name[7:].isdigit()], default=0)
    dest = run / f"attempt{k}"
    dest.mkdir()
    for p in items:
        p.rename(dest / p.name)
    return dest


def checkpoint_to_resume(cfg, output_dir: Path, ck: str) -> tuple[Path, bool]:
    """The checkpoint `ck` names (`last` = this run folder's last.ckpt), checked to exist, to load safely and to
    belong to a run with the same settings; and whether settings changed (resume_allow_changes=true)."""
    path, ckpt = read_resume_checkpoint(ck, Path(output_dir))
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
    return path, bool(diffs)


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


def _override_value(o: str) -> str:
    """The value of `key=value` as Hydra reads it: one pair of enclosing quotes removed (Lightning's DDP/FSDP
    launcher passes `hydra.run.dir="<dir>"` to the processes it starts)."""
    v = o.split("=", 1)[1]
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v


def resume_argv(argv: list[str]) -> list[str]:
    """Before Hydra composes (and writes `.hydra/` into the run folder):
    - `ckpt_path=last|auto|<file>` on a run folder: the original command's overrides (the run's
      `.hydra/overrides.yaml`), then the new ones (a new value of the same key replaces the old one, and is then
      checked by `plan_run`), and no rewrite of the run's `.hydra/`;
    - a new run into a `hydra.run.dir` that holds checkpoints or a finished run, or a multirun into a
      `hydra.sweep.dir` that holds jobs without `sweep_resume=true`: refused here, so the folder's `.hydra/`
      is not overwritten by a command that is then refused.
    Other commands are returned unchanged."""
    args = argv[1:]
    kv = {_override_key(a): _override_value(a) for a in args if "=" in a and not a.startswith("-")}
    ck = kv.get("ckpt_path")
    multirun = "-m" in args or "--multirun" in args
    if multirun:
        sweep = kv.get("hydra.sweep.dir")
        if sweep and str(kv.get("sweep_resume", "false")).lower() != "true" and Path(sweep).is_dir():
            held = [p.parent for p in Path(sweep).glob("*/config.yaml")]
            if held:
                raise ResumeError(f"hydra.sweep.dir={sweep} holds {len(held)} job folder(s) of a sweep already; "
                                  f"continue that sweep with the same command and sweep_resume=true, or choose "
                                  f"another hydra.sweep.dir")
        return argv
    run_dir = kv.get("hydra.run.dir")
    if _none(ck):
        if run_dir is not None and folder_state(Path(run_dir)) in ("interrupted", "finished"):
            plan_run({"ckpt_path": None}, Path(run_dir))  # raises, naming what the folder holds
        return argv
    if run_dir is None and ck not in ("last", "auto") and Path(ck).parent.name == "checkpoints":
        run_dir = str(Path(ck).parent.parent)
        args = args + [f"hydra.run.dir={run_dir}"]
    if run_dir is None:
        raise ResumeError(f"ckpt_path={ck} needs the run folder: add hydra.run.dir=<logs/train/runs/...>")
    state = folder_state(Path(run_dir))
    if ck == "auto" and state == "new":
        return argv  # a new run: Hydra writes its .hydra/ as usual
    if not (ck in ("last", "auto") and state in ("started", "finished")):
        read_resume_checkpoint("last" if ck == "auto" else ck, Path(run_dir))  # before Hydra creates anything
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
