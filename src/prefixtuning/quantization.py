"""Quantization of the frozen backbone (`backbone.quantization=int8|int4`), through torchao or bitsandbytes
(`backbone.quantization_backend=auto|torchao|bitsandbytes`; auto: bitsandbytes on a CUDA GPU when it is
installed, torchao otherwise).

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

bitsandbytes (`quantization_backend=bitsandbytes`): the weights are loaded straight into quantized storage by
transformers' own integration (`BitsAndBytesConfig`), one tensor at a time, so the full-precision model is
never held. int8 is LLM.int8() (`load_in_8bit`: int8 weights per output row; the activations are cast to
float16 and quantized per row in each matmul, outlier features above 6.0 kept in float16), so it is not
weight-only; int4 is NF4 with the backbone's dtype as compute dtype (`load_in_4bit`, QLoRA's format: the weight
is dequantized per block of 64 in each matmul, weight-only). bitsandbytes 0.50 runs both on the CPU as well.

Refused with a sentence, before training: a backbone with no nn.Linear projection in its layers (GPT-2's
Conv1D), and a method that trains the backbone's own weights (method=finetune / finetune_top2).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

CHOICES = ("none", "int8", "int4")
BACKENDS = ("auto", "torchao", "bitsandbytes")
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


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def resolve_backend(kind: str, backend: str, on_cuda: bool) -> str:
    """The library that quantizes: "none" without quantization; auto = bitsandbytes on a CUDA GPU when it is
    installed, torchao otherwise. A backend asked for by name and not installed is an error."""
    if kind == "none":
        return "none"
    if backend not in BACKENDS:
        raise QuantizationError(f"backbone.quantization_backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "bitsandbytes" if on_cuda and bitsandbytes_available() else "torchao"
    if backend == "bitsandbytes" and not bitsandbytes_available():
        raise QuantizationError("backbone.quantization_backend=bitsandbytes needs bitsandbytes "
                                "(pip install bitsandbytes==0.50.0)")
    return backend


def bitsandbytes_config(kind: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for int8 (LLM.int8) or int4 (NF4, compute in the backbone's dtype)."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise QuantizationError(f"backbone.quantization={kind!r}: choose one of {', '.join(CHOICES)}")


def quantized_modules(model: nn.Module) -> list[str]:
    """Modules whose weight is stored quantized (either library)."""
    return [n for n, m in model.named_modules() if getattr(m, "weight", None) is not None and is_quantized(m.weight)]


def keep_differentiable(model: nn.Module) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16: a Linear4bit in eval mode whose input does not require grad
    (q/k/v under a frozen backbone, where only the prefix trains) converts its weight, once and for good, to a
    packed inference layout whose kernel has no backward; every later call, also with an input that does require
    grad (o_proj after a prefixed attention), then passes no gradient, and the prefix would silently not train.
    Turning that conversion off keeps every call on the differentiable NF4 matmul (the same numbers; slower
    inference on such CPUs)."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


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


def dequantized_weight(m: nn.Module) -> torch.Tensor:
    """The float weight a quantized projection stands for: torchao's `dequantize()`, bitsandbytes' int8 rows
    times their scales / 127, or its NF4 blocks dequantized."""
    w = m.weight
    if hasattr(w, "dequantize") and not hasattr(w, "quant_state") and not hasattr(w, "SCB"):
        return w.dequantize().detach().float()
    if getattr(w, "quant_state", None) is not None:  # bitsandbytes Params4bit
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None) if getattr(w, "SCB", None) is not None else getattr(m.state, "SCB", None)
    return w.data.float() * scb.float()[:, None] / 127.0  # bitsandbytes Int8Params: int8 rows and row scales


def dequantized_copy(model: nn.Module) -> None:
    """Replace every quantized projection by a plain nn.Linear holding its dequantized float weight, in place
    (the oracle the tests compare the quantized model with: the same weights, no quantized kernel)."""
    for name in quantized_modules(model):
        m = model.get_submodule(name)
        w = dequantized_weight(m)
        plain = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, dtype=w.dtype)
        plain.weight = nn.Parameter(w.clone(), requires_grad=False)
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, plain)
