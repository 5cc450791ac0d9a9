"""W&B that answers the questions of a sweep (logger=wandb; offline unless the user configured W&B).

- Run identity: a name from the overrides, the experiment (or the sweep folder) as the group, the method as
  the job type, and tags (method, dataset, backbone, prefix kind). Set logger.name / group / tags to override.
- The learning rate every step (Lightning's LearningRateMonitor).
- The summary: test metrics, parameter counts (trainable, frozen, share of the backbone), the run folder.
- APT: the gate heatmap of the validation inputs as an image at each validation (`GateImages`).
- The trained tensors (the export: prefix without MLP, or the method's tensors) as a `model` artifact.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from .export import export_model
from .gates import probe_gates, write_gate_report


def _hydra_runtime():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # outside Hydra (tests, notebooks)
        return None


def run_identity(cfg) -> dict:
    """name, group, job_type and tags of the W&B run, from the command's overrides and the config."""
    hc = _hydra_runtime()
    overrides = [o for o in (list(hc.overrides.task) if hc else [])
                 if not o.lstrip("+~").startswith(("hydra.", "paths.", "logger."))]
    method = cfg.get("method", {}).get("kind", "prefix")
    prefix = cfg.get("prefix", {}).get("kind", "none")
    backbone = str(cfg.backbone.name_or_path).split("/")[-1]
    name = cfg.logger.get("name") or (" ".join(overrides) if overrides else f"{method} {cfg.data.name} {backbone}")
    group = cfg.logger.get("group")
    if group is None and hc is not None:
        choice = hc.runtime.choices.get("experiment")
        group = choice if choice not in (None, "null") else (
            Path(hc.sweep.dir).name if str(hc.mode) == "RunMode.MULTIRUN" else None)
    tags = [f"method={method}", f"data={cfg.data.name}", f"backbone={backbone}"]
    if method == "prefix":
        tags.append(f"prefix={prefix}")
    return {"name": name, "group": group, "job_type": method,
            "tags": list(dict.fromkeys([*tags, *map(str, cfg.logger.get("tags") or [])]))}


def is_wandb(logger) -> bool:
    return logger is not None and type(logger).__name__ == "WandbLogger"


def finish_run(trainer, model, cfg, metrics: dict, output_dir: Path) -> None:
    """Summary (test metrics, parameter counts) and the artifact of the trained tensors; rank 0 only."""
    logger = trainer.logger
    if not is_wandb(logger) or trainer.global_rank != 0:
        return
    keys = ("trainable_params", "frozen_params", "backbone_params", "trainable_share_of_backbone",
            "inference_params", "backbone", "method")
    summary = {k: metrics[k] for k in keys if k in metrics}
    summary.update({k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, (int, float))})
    summary["output_dir"] = str(output_dir)
    run = logger.experiment
    for k, v in summary.items():
        run.summary[k] = v
    import wandb  # only here: a run logged to W&B (logger=wandb) needs it

    export_dir = output_dir / "export"
    export_model(model, export_dir, None)
    art = wandb.Artifact(name=f"{model.method.kind}-{run.id}", type="model",
                         metadata={"method": model.method.describe(), "backbone": model.backbone.name})
    art.add_dir(str(export_dir))
    run.log_artifact(art)


class GateImages(L.Callback):
    """At each validation of an APT prefix: the mean gates of the first `max_inputs` validation inputs as
    a layer x token heatmap image (W&B key `val/gates`)."""

    def __init__(self, datamodule, output_dir: Path, max_inputs: int = 50):
        self.dm, self.out, self.max_inputs = datamodule, Path(output_dir), int(max_inputs)

    def on_validation_end(self, trainer, pl_module):
        method = pl_module.model.method
        if trainer.sanity_checking or not method.gated or not is_wandb(trainer.logger) or trainer.global_rank != 0:
            return
        prefix = method.gated_prefix()
        groups = self.dm.eval_groups("dev")[: self.max_inputs]
        was_training = pl_module.training
        gates = probe_gates(pl_module.model, [self.dm.featurizer.prompt_ids(g.source) for g in groups])
        pl_module.train(was_training)
        paths = write_gate_report(gates, prefix, self.out / "gates_val", f"step{trainer.global_step}")
        trainer.logger.log_image(key="val/gates", images=[str(paths["png"])], step=trainer.global_step)
