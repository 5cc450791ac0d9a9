"""Full fine-tuning and FT-top2 (Li & Liang 2021, Table 2 baselines)."""

from __future__ import annotations

from torch import nn

from ..settings import INT, S
from .base import Method, register_method


def layer_stack(backbone) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the transformer layers the LM head reads from: the decoder stack."""
    n = backbone.geometry.sites["decoder"].n_layers
    found = [(name, m) for name, m in backbone.model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name.split(".")[-1] in ("h", "layers")
             and (not backbone.is_encoder_decoder or "decoder" in name)]
    if not found:
        raise ValueError(f"cannot find the decoder layer stack of a {backbone.geometry.model_type} backbone")
    return found[-1]


def final_norms(backbone, stack_name: str) -> list[tuple[str, nn.Module]]:
    """Norms applied after the last layer: children of the stack's parent, not embedding norms."""
    parent = stack_name.rsplit(".", 1)[0] if "." in stack_name else ""
    mods = dict(backbone.model.named_modules())
    out = []
    for name, m in mods[parent].named_children():
        full = f"{parent}.{name}" if parent else name
        if "norm" in type(m).__name__.lower() or name.startswith(("ln_f", "norm", "layer_norm")):
            if "embed" not in name and not isinstance(m, nn.ModuleList):
                out.append((full, m))
    return out


def untied_head(backbone) -> nn.Module | None:
    head, emb = backbone.model.get_output_embeddings(), backbone.model.get_input_embeddings()
    if head is None or head.weight.data_ptr() == emb.weight.data_ptr():
        return None
    return head


@register_method("finetune")
class FineTune(Method):
    """Every backbone weight trains (the paper's FT). Checkpoints and exports hold the whole model."""
    trains_backbone = True

    def __init__(self, backbone):
        super().__init__(backbone)
        for p in backbone.model.parameters():
            p.requires_grad_(True)

    def summary(self) -> str:
        return "full fine-tuning"


@register_method("finetune_top2")
class FineTuneTop2(Method):
    """The paper's FT-TOP2: only the top 2 transformer layers of the decoder stack train, with the norm
    applied after them (GPT-2 `ln_f`, Llama `norm`) and the LM head when it is not tied to the input
    embeddings (tied heads stay frozen with the embeddings). Everything else stays bit-identical."""
    trains_backbone = True

    settings = {"layers": S(INT, min=1)}

    def __init__(self, backbone, layers: int = 2):
        super().__init__(backbone, layers=int(layers))
        name, stack = layer_stack(backbone)
        if not 1 <= layers <= len(stack):
            raise ValueError(f"method.layers={layers} but the backbone has {len(stack)} layers")
        self.trained = [f"{name}.{i}" for i in range(len(stack) - layers, len(stack))]
        self.trained += [n for n, _ in final_norms(backbone, name)]
        modules = [stack[i] for i in range(len(stack) - layers, len(stack))] + [m for _, m in final_norms(backbone, name)]
        head = untied_head(backbone)
        if head is not None:
            modules.append(head)
            self.trained.append("lm_head (untied)")
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)

    def summary(self) -> str:
        return f"top {self.settings['layers']} layers: {', '.join(self.trained)}"
