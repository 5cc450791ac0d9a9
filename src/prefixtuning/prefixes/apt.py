"""Adaptive Prefix Tuning (Zhang et al., ACL 2023): a static prefix rescaled per layer and per token.

For layer i of a site: token gate alpha_i = sigmoid(pool(h_{i-1}) W_i + b_i) in (0, 1)^P and a learned layer
scale lambda_i; the prefix keys and values become lambda_i * alpha_i * P_k and lambda_i * alpha_i * P_v.

Choices the paper leaves open, or where this implementation differs from it (also in the README):
- Step 0 is the static prefix it wraps: W_i = 0 (`gate_init_std=0.0`), b_i = `gate_bias_init` (0) and
  lambda_i = 1 / sigmoid(b_i) (2), so lambda_i * alpha_i = 1 exactly and a task-words initialization is
  kept as it is. (A random W_i, `gate_init_std > 0`, starts only approximately there.)
- Which hidden state is pooled, and how: h_{i-1} is the input of layer i's attention as the attention
  module receives it (after the layer's input norm), averaged with a mask over the source tokens only:
  decoder-only backbones pool the prompt (source) part of the sequence, so training and generation see the
  same gate; an encoder pools its input; the decoder self-attention and cross-attention gates of an
  encoder-decoder pool the encoder output (the decoder's own tokens are the target).
- One gate per prefix position, shared by keys and values (the paper's Eq. gates the prefix as a whole).
- Generation: the gate is computed once per `generate` call, at prefill over the source, and kept for every
  decoding step and every beam of an example.
- Prefix dropout (`prefix.dropout`, P-Tuning v2 uses 0.1) is available for every prefix kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..settings import FLOAT, S
from .base import register_prefix
from .static import StaticPrefix


@register_prefix("apt")
class APTPrefix(StaticPrefix):
    gated = True
    settings = {**StaticPrefix.settings, "gate_init_std": S(FLOAT, min=0), "gate_bias_init": S(FLOAT)}
    exported = ("keys", "values", "gate_weight", "gate_bias", "layer_scale")

    def __init__(self, geometry, length: int, sites=None, gate_init_std: float = 0.0, gate_bias_init: float = 0.0,
                 dropout: float = 0.0):
        super().__init__(geometry, length, sites, dropout=dropout)
        d = geometry.hidden_size
        self.gate_weight = nn.ParameterDict()
        self.gate_bias = nn.ParameterDict()
        self.layer_scale = nn.ParameterDict()
        self.gate_init_std = float(gate_init_std)
        self.gate_bias_init = float(gate_bias_init)
        lam = 1.0 / torch.sigmoid(torch.tensor(self.gate_bias_init)).item()  # lambda_i * sigmoid(b_i) = 1
        for s in self.sites:
            L = geometry.sites[s].n_layers
            self.gate_weight[s] = nn.Parameter(torch.randn(L, d, self.length) * self.gate_init_std)  # W_i
            self.gate_bias[s] = nn.Parameter(torch.full((L, self.length), self.gate_bias_init))  # b_i
            self.layer_scale[s] = nn.Parameter(torch.full((L,), lam))  # lambda_i
        self.last_token_gates: dict[tuple[str, int], Tensor] = {}

    def extra_config(self) -> dict:
        return {"gate_init_std": self.gate_init_std, "gate_bias_init": self.gate_bias_init}

    def gate(self, site: str, layer: int, pooled: Tensor) -> Tensor:
        """(B, d) pooled layer input -> (B, P) scale lambda_i * alpha_i."""
        w = self.gate_weight[site][layer]  # (d, P)
        alpha = torch.sigmoid(pooled.to(w.dtype) @ w + self.gate_bias[site][layer])  # (B, P)
        self.last_token_gates[(site, layer)] = alpha.detach()
        return self.layer_scale[site][layer] * alpha

    def token_gates(self, site: str | None = None) -> Tensor:
        """Token gates alpha of the last forward, (B, n_layers, P): the method's probe (plot as a heatmap)."""
        site = site or self.sites[0]
        L = self.geometry.sites[site].n_layers
        missing = [i for i in range(L) if (site, i) not in self.last_token_gates]
        if missing:
            raise RuntimeError(f"no gate values for {site} layers {missing}: run a forward pass first")
        return torch.stack([self.last_token_gates[(site, i)] for i in range(L)], dim=1)

    def layer_scales(self, site: str | None = None) -> Tensor:
        return self.layer_scale[site or self.sites[0]].detach()
