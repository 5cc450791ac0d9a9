"""Where adapters and LoRA attach: linear layers of the backbone found by name, per family."""

from __future__ import annotations

from torch import nn

# output projections of attention (self and cross) and of the feed-forward block, by family
# (BERT family: attention.output.dense and the layer's output.dense, before each residual LayerNorm: Houlsby's places)
ATTENTION_OUT = ("attn.c_proj", "self_attn.o_proj", "self_attn.out_proj", "encoder_attn.out_proj",
                 "attention.output.dense")
FFN_OUT = ("mlp.c_proj", "mlp.down_proj", "fc2", "output.dense")
# LoRA's default targets (as HF PEFT's defaults): GPT-2's fused q/k/v projection, else q and v
LORA_TARGETS = {"gpt2": ("attn.c_attn",), "llama": ("q_proj", "v_proj"), "bart": ("q_proj", "v_proj"),
                **{f: ("query", "value") for f in ("bert", "roberta", "xlm-roberta", "camembert", "electra")}}


def linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[0], m.weight.shape[1]
    raise TypeError(f"{type(m).__name__} is not a linear layer")


def find(backbone, suffixes, exclude=()) -> list[tuple[str, nn.Module]]:
    """Linear layers whose path ends with one of `suffixes`, except those listed in `exclude` (names)."""
    return [(n, m) for n, m in backbone.model.named_modules()
            if any(n == s or n.endswith("." + s) for s in suffixes) and n not in exclude
            and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]


def key(name: str) -> str:
    return name.replace(".", "__")
