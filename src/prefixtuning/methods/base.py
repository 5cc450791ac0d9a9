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

from ..errors import UserError
from ..artifacts import METHOD_EXPORT, Format, check_tensor_names
from ..prefixes import Prefix
from ..settings import Spec

METHODS: dict[str, type["Method"]] = {}


def register_method(kind: str):
    def deco(cls):
        cls.kind = kind
        METHODS[kind] = cls
        return cls
    return deco


class NoPrefixError(UserError, AttributeError, ValueError):
    """Asked for the prefix (or its gates) of a method that has none."""


class Method(nn.Module):
    kind = "base"
    # trains the backbone's own weights (full fine-tuning): refused on a quantized backbone
    trains_backbone = False
    # root config groups this method reads besides `method` (the others are set to `none` by its config)
    reads = ()
    # the `method.*` config keys this method reads besides `kind` (checked before any work by config_check)
    settings: dict[str, Spec] = {}
    # `generate` returns only new tokens (inputs given as embeddings)
    generates_from_embeddings = False
    # a decoder-only backbone's real tokens start after the method's positions (the prefix method's setting)
    shift_positions = False

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

    # ---------------------------------------------------------------- the prefix, for the methods that have one
    def prefix_module(self) -> Prefix:
        """The trained prefix (prefix method); other methods raise NoPrefixError with a sentence."""
        raise NoPrefixError(f"method={self.kind} has no prefix")

    def set_prefix(self, prefix: Prefix) -> None:
        raise NoPrefixError(f"method={self.kind} has no prefix")

    @property
    def gated(self) -> bool:
        """True when the method computes APT gates (the gate probe and its heatmaps apply)."""
        return False

    def gated_prefix(self) -> Prefix:
        """The APT prefix whose gates the probe reads; an error naming what this model has instead."""
        raise NoPrefixError(f"the gate probe needs an APT prefix (prefix=apt); this model has method={self.kind}")

    # ---------------------------------------------------------------- export and rebuild
    # What an export of this method holds: the tensors, the metadata besides identity and config, the format.
    export_format: Format = METHOD_EXPORT

    def export_payload(self, model) -> tuple[dict[str, Tensor], dict]:
        """(tensors, metadata) of the export: by default every tensor that trains, named as in the model
        (every backbone weight for finetune; adapters, LoRA and prompts only theirs)."""
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return tensors, {"method": self.describe(), "tensors": len(tensors)}

    @classmethod
    def from_export(cls, backbone, method_cfg: dict, prefix_cfg: dict | None, meta: dict,
                    tensors: dict[str, Tensor], source: str) -> "Method":
        """The method an export was written from, before `restore` puts its tensors in (by default: built
        from the run config, as training built it)."""
        return build_method(method_cfg, backbone, prefix_cfg=prefix_cfg)

    def restore(self, model, tensors: dict[str, Tensor], source: str) -> None:
        """Load an export's tensors (as `export_payload` named them) into `model`."""
        check_tensor_names(source, tensors, [n for n, p in model.named_parameters() if p.requires_grad],
                           f"method {self.describe()}")
        model.load_state_dict(tensors, strict=False)

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
