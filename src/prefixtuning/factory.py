"""Building a model from a run config: backbone + method (+ prefix), and its initialization.

The one place that does it, below training, checkpoint loading, evaluation and export (which all import
from here and not from each other). New methods extend `methods.METHODS`; nothing here changes.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from .backbone import Backbone
from .local_backbones import is_local_backbone
from .methods import build_method
from .errors import UserError
from .model import TunedModel
from .nlu import NLU_TASKS, build_nlu_model, is_nlu


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def load_backbone(cfg, trained_on: str | None = None) -> Backbone:
    """The run's backbone. `trained_on`: the backbone a checkpoint or export names; when that was a local
    substitute (the run had no hub access), the same substitute is loaded, not the hub id of the config."""
    b = cfg.backbone
    name = b.name_or_path
    if trained_on and trained_on != name and is_local_backbone(trained_on):
        name = trained_on
    return Backbone.load(name, offline_substitute=b.get("offline_substitute"), cache_dir=b.get("cache_dir"),
                         dtype=b.get("dtype", "float32"), dropout=b.get("dropout"),
                         gradient_checkpointing=b.get("gradient_checkpointing", False),
                         quantization=b.get("quantization", "none"),
                         quantization_backend=b.get("quantization_backend", "auto"),
                         accelerator=OmegaConf.select(cfg, "trainer.accelerator"))


def method_config(cfg) -> dict:
    """cfg.method, or the prefix method for run configs written before methods existed."""
    return _plain(cfg.method) if cfg.get("method") is not None else {"kind": "prefix"}


def prefix_config(cfg) -> dict | None:
    """cfg.prefix (read by the prefix method), or None when the run has no prefix group."""
    return _plain(cfg.prefix) if cfg.get("prefix") is not None else None


def build_model(cfg, backbone: Backbone):
    """TunedModel for the generation tasks; NLUModel (backbone + method + task head) for data=<NLU task>."""
    nlu = is_nlu(cfg)
    if backbone.is_encoder_only and not nlu:
        raise UserError(f"backbone {backbone.name} is an encoder ({backbone.geometry.model_type}, no LM head): it runs "
                        f"the NLU tasks (data={', '.join(NLU_TASKS)}), not data={cfg.data.name}")
    try:  # a method or head that cannot attach to this backbone: one sentence, before any work
        method = build_method(method_config(cfg), backbone, prefix_cfg=prefix_config(cfg))
        return build_nlu_model(cfg, backbone, method) if nlu else TunedModel(backbone, method)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"method={method_config(cfg).get('kind')} on backbone {backbone.name}: {err}") from None


def initialize(cfg, model: TunedModel) -> dict:
    """The `init/` group, applied by the methods that read it (prefix, prompt)."""
    if "init" not in model.method.reads:
        return model.method.initialize({}, model.backbone)
    return model.method.initialize(_plain(cfg.init), model.backbone)


def parameter_report(model: TunedModel) -> dict:
    """Trainable parameters as a share of the backbone's own (added adapter / LoRA weights not counted in
    the denominator), and what inference needs (the prefix as served, without the reparam MLP)."""
    own = {id(p) for p in model.backbone.model.parameters()}
    backbone = sum(p.numel() for p in model.backbone.model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.backbone.model.parameters() if not p.requires_grad)
    added = sum(p.numel() for p in model.method.parameters() if id(p) not in own)
    return {"backbone": model.backbone.name, "backbone_dtype": model.backbone.dtype, "method": model.method.kind,
            "trainable_params": trainable,
            "frozen_params": frozen, "backbone_params": backbone, "added_params": added,
            "inference_params": model.method.inference_params(model),
            "trainable_share_of_backbone": trainable / backbone}
