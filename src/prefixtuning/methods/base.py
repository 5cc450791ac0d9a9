"""What every training method provides, and the registry that maps `method.kind` to a class.

A method decides which tensors train and how they act on the frozen backbone:

    prefix         key/value prefix at every attention site (the `prefix/` group picks static, reparam, apt)
    finetune       every backbone weight
    finetune_top2  the top 2 transformer layers (+ final norm, + LM head if untied)
    adapter        Houlsby bottleneck adapters after attention and after the FFN
    prompt         P trainable input vectors (prompt tuning; the paper's embedding-only ablation)
    lora           low-rank updates of the attention projections

The model (`model.TunedModel`) calls the hooks below and nothing else, so data, Lightning module,
decoding, metrics, checkpoints, resume, evaluate and W&B are the same for every method. Checkpoints and
exports hold exactly the tensors that require gradients (`trainable_state`).
"""

from __future__ import annotations

from torch import Tensor, nn

METHODS: dict[str, type["Method"]] = {}


def register_method(kind: str):
    def deco(cls):
        cls.kind = kind
        METHODS[kind] = cls
        return cls
    return deco


class Method(nn.Module):
    kind = "base"
    # root config groups this method reads besides `method` (the others are set to `none` by its config)
    reads = ()
    # `generate` returns only new tokens (inputs given as embeddings)
    generates_from_embeddings = False

    def __init__(self, backbone, **settings):
        super().__init__()
        self.settings = dict(settings)

    # ---------------------------------------------------------------- how it acts on the backbone
    def position_offset(self, backbone) -> int:
        """Where the real tokens of a decoder-only backbone start (a prefix may take positions 0..P-1)."""
        return 0

    def positions_taken(self, backbone) -> int:
        """Positions of each input sequence the method uses besides the tokens (checked before training)."""
        return self.position_offset(backbone)

    def activate(self, backbone, source_mask: Tensor | None, keep_gates: bool = False) -> None:
        """Before a forward pass or a `generate` call."""
        backbone.injector.deactivate()

    def deactivate(self, backbone) -> None:
        backbone.injector.deactivate()

    def after_generate(self, num_beams: int) -> None:
        """After `generate` (APT keeps one row of gates per example, not per beam)."""

    def prepare(self, backbone, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> dict:
        """The backbone's inputs for a batch; methods that change the input sequence override this."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # ---------------------------------------------------------------- set-up and reporting
    def initialize(self, init_cfg: dict, backbone) -> dict:
        return {"init": "none", "why": f"method={self.kind} starts from the pretrained weights"}

    def export(self, model, out_dir, config: dict | None = None):
        """Write what inference needs (export.py); returns the weights file."""
        from ..export import export_method

        return export_method(model, out_dir, config)

    def describe(self) -> dict:
        """Identity stored in checkpoints and exports; a checkpoint loads only into the same description."""
        return {"kind": self.kind, **self.settings}

    def summary(self) -> str:
        return self.kind

    def inference_params(self, model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_method(cfg: dict, backbone, prefix_cfg: dict | None = None) -> Method:
    """Instantiate `cfg['kind']` from the registry with the rest of `cfg` as keyword arguments."""
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in METHODS:
        raise ValueError(f"method.kind={kind!r} is not registered; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[kind]
    if "prefix" in cls.reads:
        cfg["prefix_cfg"] = prefix_cfg
    return cls(backbone, **cfg)
