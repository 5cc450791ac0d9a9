"""LoRA (Hu et al. 2022): W x -> W x + (alpha / r) B A dropout(x) on the attention projections, A (r x in)
Kaiming-uniform and B (out x r) zero, so step 0 is the backbone exactly.

Written here rather than taken from HF PEFT: PEFT wraps the model (a PeftModel with renamed modules and its
own state-dict keys) and is this project's test oracle, not a runtime dependency; attaching the update
with a forward hook keeps the backbone, the attention function, checkpoints and generation untouched.
tests/test_methods.py checks it equal to PEFT's LoRA for the same A and B. Targets default to PEFT's per
family (GPT-2: the fused q/k/v `c_attn`; Llama and BART: `q_proj`, `v_proj`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..settings import FLOAT, INT, LIST, S
from .base import Method, register_method
from .hooks import LORA_TARGETS, find, key, linear_dims


class LoRALayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.t() @ self.B.t()) * self.scale


@register_method("lora")
class LoRAMethod(Method):
    settings = {"rank": S(INT, min=1), "alpha": S(FLOAT, above=0), "dropout": S(FLOAT, min=0, max=1),
                "targets": S(LIST, null=True)}

    def __init__(self, backbone, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: list[str] | None = None):
        targets = tuple(targets) if targets else LORA_TARGETS.get(backbone.geometry.model_type)
        if not targets:
            raise ValueError(f"no default LoRA targets for {backbone.geometry.model_type}; set method.targets")
        super().__init__(backbone, rank=int(rank), alpha=float(alpha), dropout=float(dropout), targets=list(targets))
        self.layers = nn.ModuleDict()
        found = find(backbone, targets)
        if not found:
            raise ValueError(f"method.targets={list(targets)} match no linear layer of the backbone")
        for name, m in found:
            d_in, d_out = linear_dims(m)
            self.layers[key(name)] = LoRALayer(d_in, d_out, int(rank), float(alpha), float(dropout))
            m.register_forward_hook(self._hook(key(name)))

    def _hook(self, k: str):
        def hook(module, args, output):
            return output + self.layers[k](args[0]).to(output.dtype)
        return hook

    def summary(self) -> str:
        s = self.settings
        return f"LoRA r={s['rank']} alpha={s['alpha']} on {len(self.layers)} projections ({', '.join(s['targets'])})"
