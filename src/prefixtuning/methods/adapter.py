"""Houlsby adapters (Houlsby et al. 2019; the paper's ADAPTER baseline): a bottleneck
h -> h + W_up act(W_down h) after every attention output projection (self and, for BART, cross) and every
feed-forward output projection, before dropout and the residual sum. W_up starts at zero, so step 0 is the
backbone exactly.

Size: `bottleneck` r, or `share`, the fraction of the backbone's parameters the adapters should hold:
r = round((share * N / n_adapters - d) / (2d + 1)), at least 1 (each adapter holds 2dr + r + d). On GPT-2
medium (354,823,168 parameters, 48 adapters, d=1024) share 0.001 gives r=3 (344,208 = 0.097%) and share
0.03 gives r=108 (10,671,168 = 3.007%).
"""

from __future__ import annotations

import torch
from torch import nn

from ..settings import FLOAT, INT, STR, S
from .base import Method, register_method
from .hooks import ATTENTION_OUT, FFN_OUT, find, key, linear_dims

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    def __init__(self, d: int, r: int, activation: str):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


@register_method("adapter")
class AdapterMethod(Method):
    settings = {"share": S(FLOAT, null=True, above=0, max=1), "bottleneck": S(INT, null=True, min=1),
                "activation": S(STR, choices=("relu", "gelu", "tanh"))}

    def __init__(self, backbone, bottleneck: int | None = None, share: float | None = 0.03,
                 activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"method.activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")
        attention = find(backbone, ATTENTION_OUT)
        sites = attention + find(backbone, FFN_OUT, exclude={n for n, _ in attention})
        if not sites:
            raise ValueError(f"no attention / FFN output projections found in a {backbone.geometry.model_type} backbone")
        d = backbone.geometry.hidden_size
        if bottleneck is None:
            if not share:
                raise ValueError("set method.bottleneck or method.share")
            n_backbone = sum(p.numel() for p in backbone.model.parameters())
            bottleneck = max(1, round((share * n_backbone / len(sites) - d) / (2 * d + 1)))
        super().__init__(backbone, bottleneck=int(bottleneck), activation=activation)
        self.adapters = nn.ModuleDict()
        for name, m in sites:
            _, out = linear_dims(m)
            self.adapters[key(name)] = Adapter(out, int(bottleneck), activation)
            m.register_forward_hook(self._hook(key(name)))

    def _hook(self, k: str):
        def hook(module, args, output):
            return self.adapters[k](output)
        return hook

    def summary(self) -> str:
        return f"{len(self.adapters)} Houlsby adapters, bottleneck {self.settings['bottleneck']}"
