"""APT's and P-tuning v2's NLU setting: SuperGLUE and NER tasks on encoder (BERT-family) or decoder-only
backbones, a task head trained with the method. `data=<task>` (conf/data/<task>.yaml) selects it; the flow,
checkpoints, resume and reports are train.py's (training.py)."""

from __future__ import annotations

from omegaconf import OmegaConf

from ..data.base import DATASETS
from .model import NLUModel
from .tasks import NLU_TASKS, NLUTask


def is_nlu(cfg) -> bool:
    """Whether a run config is an NLU task (data=cb, rte, ..., conll04)."""
    return OmegaConf.select(cfg, "data.name") in NLU_TASKS


def build_task(data_cfg) -> NLUTask:
    files = dict(data_cfg.files) if data_cfg.get("files") else None
    return DATASETS[data_cfg.name](data_dir=data_cfg.get("data_dir"), files=files,
                                   dev_fraction=data_cfg.get("dev_fraction", 0.1))


def build_nlu_model(cfg, backbone, method) -> NLUModel:
    head = cfg.get("head") or {}
    return NLUModel(backbone, method, build_task(cfg.data), head.get("pooling", "cls"), head.get("dropout", 0.1))
