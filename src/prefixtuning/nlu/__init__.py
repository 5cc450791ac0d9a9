"""APT's and P-tuning v2's NLU setting: SuperGLUE and NER tasks on encoder (BERT-family) or decoder-only
backbones, a task head trained with the method. `data=<task>` (conf/data/<task>.yaml) selects it; the flow,
checkpoints, resume and reports are train.py's (training.py)."""

from __future__ import annotations

from omegaconf import OmegaConf

from .model import NLUModel
from .tasks import NLU_TASKS, build_task  # noqa: F401 (part of this package's interface)


def is_nlu(cfg) -> bool:
    """Whether a run config is an NLU task (data=cb, rte, ..., conll04)."""
    return OmegaConf.select(cfg, "data.name") in NLU_TASKS


def build_nlu_model(cfg, backbone, method) -> NLUModel:
    head = cfg.get("head") or {}
    return NLUModel(backbone, method, build_task(cfg.data), head.get("pooling", "cls"), head.get("dropout", 0.1))
