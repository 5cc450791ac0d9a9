"""Static prefix: the per-layer key/value tensors themselves are the parameters (Li & Liang's
"direct" parameterization, also the base of P-tuning v2 and APT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Prefix, fit_error, register_prefix


@register_prefix("static")
class StaticPrefix(Prefix):
    exported = ("keys", "values")

    def __init__(self, geometry, length: int, sites=None, dropout: float = 0.0):
        super().__init__(geometry, length, sites, dropout=dropout)
        self.keys = nn.ParameterDict()
        self.values = nn.ParameterDict()
        for s in self.sites:
            self.keys[s] = nn.Parameter(torch.randn(self.kv_shape(s)))  # (L, n_kv, P, hd)
            self.values[s] = nn.Parameter(torch.randn(self.value_shape(s)))  # (L, n_kv, P, value hd)

    def key_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {s: self._batched(self.keys[s], self.values[s]) for s in self.sites}

    @torch.no_grad()
    def set_key_values(self, target):
        for s, (k, v) in target.items():
            self.keys[s].copy_(k)
            self.values[s].copy_(v)
        return fit_error(self, target)

    @torch.no_grad()
    def reset_random(self, std: float) -> bool:
        for s in self.sites:
            self.keys[s].normal_(0.0, std)
            self.values[s].normal_(0.0, std)
        return True
