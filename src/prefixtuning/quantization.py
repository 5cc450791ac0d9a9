"""Weight-only quantization of the frozen backbone (`backbone.quantization=int8|int4`), through torchao.

Only the backbone's linear projections inside its layers are quantized (attention and MLP; not the embeddings,
not the LM head, which many models tie to the embeddings). The prefix, APT's gates, LoRA / adapter / prompt
weights stay in float32 and train as on a full-precision base; gradients pass through the quantized
projections to them. A prefix trained on a quantized base is a prefix of the same backbone: its checkpoint and
exports load onto the full-precision model (the identity is the model and its geometry, not its storage).

- int8: torchao `Int8WeightOnlyConfig`, symmetric per output channel; a matmul dequantizes the weight on the
  fly (CPU and CUDA).
- int4: torchao `IntxWeightOnlyConfig(int4, groups of 32)`, symmetric per group. On the CPU torchao 0.18
  keeps the 4-bit values unpacked in int8 storage (its packed int4 kernels need CUDA), so the memory is int8's
  plus the group scales; the numbers are 4-bit. docs/benchmarks.md has the measured memory and speed.

Refused with a sentence, before training: a backbone with no nn.Linear projection in its layers (GPT-2's
Conv1D), and a method that trains the backbone's own weights (method=finetune / finetune_top2).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

CHOICES = ("none", "int8", "int4")
INT4_GROUP = 32


class QuantizationError(UserError, ValueError):
    pass


def _config(kind: str):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as err:
        raise QuantizationError(f"backbone.quantization={kind} needs torchao (pip install torchao==0.18.0): "
                                f"{err}") from None
    if kind == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def targets(model: nn.Module) -> list[str]:
    """The projections that are quantized: nn.Linear modules inside the layers, not the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def quantize_backbone(model: nn.Module, kind: str, name: str) -> int:
    """Quantize `model` in place; returns how many projections were quantized (never 0: an error instead)."""
    if kind == "none":
        return 0
    if kind not in CHOICES:
        raise QuantizationError(f"backbone.quantization={kind!r}: choose one of {', '.join(CHOICES)}")
    names = set(targets(model))
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight") and m.weight is not None
                        and getattr(m.weight, "ndim", 0) == 2})
        raise QuantizationError(f"backbone.quantization={kind}: {name} has no nn.Linear projection to quantize "
                                f"(its 2-d weights live in {', '.join(kinds)}); quantize a backbone with linear "
                                f"projections (Llama, Qwen, Mistral, T5, BART, ...) or use quantization=none")
    if kind == "int4":
        bad = [n for n in names if model.get_submodule(n).in_features % INT4_GROUP]
        if bad:
            n_in = model.get_submodule(bad[0]).in_features
            raise QuantizationError(f"backbone.quantization=int4: {name}.{bad[0]} has {n_in} inputs, not a multiple "
                                    f"of the group size {INT4_GROUP}")
    from torchao.quantization import quantize_

    quantize_(model, _config(kind), filter_fn=lambda m, fqn: fqn in names)
    done = [n for n in names if is_quantized(model.get_submodule(n).weight)]
    if len(done) != len(names):
        raise QuantizationError(f"backbone.quantization={kind}: torchao quantized {len(done)} of {len(names)} "
                                f"projections of {name}")
    return len(names)


def is_quantized(w) -> bool:
    return type(w) not in (torch.Tensor, nn.Parameter)


def dequantized_copy(model: nn.Module) -> None:
    """Replace every quantized weight by its dequantized float tensor, in place (the oracle the tests compare
    the quantized model with: the same numbers, computed without quantized kernels)."""
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and w is not None and is_quantized(w):
            m.weight = nn.Parameter(w.dequantize().detach().clone(), requires_grad=False)
