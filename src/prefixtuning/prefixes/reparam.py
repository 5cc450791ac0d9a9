"""Reparameterized prefix (Li & Liang 2021, Sec. 4.3): a P x d embedding through an MLP
(Linear d -> mid, tanh, Linear mid -> n_layers * 2 * n_kv_heads * head_dim), one per attention site.
The MLP only stabilizes training: `to_static()` drops it and returns the computed prefix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..settings import INT, S
from .base import Prefix, fit_error, register_prefix
from .static import StaticPrefix


@register_prefix("reparam")
class ReparamPrefix(Prefix):
    settings = {**Prefix.settings, "mid_dim": S(INT, min=1)}

    def __init__(self, geometry, length: int, sites=None, mid_dim: int = 512, dropout: float = 0.0):
        super().__init__(geometry, length, sites, dropout=dropout)
        self.mid_dim = int(mid_dim)
        d = geometry.hidden_size
        self.embeddings = nn.ParameterDict()
        self.mlps = nn.ModuleDict()
        for s in self.sites:
            L, n_kv, _, hd = self.kv_shape(s)
            vd = self.value_shape(s)[-1]
            self.embeddings[s] = nn.Parameter(torch.randn(self.length, d))
            self.mlps[s] = nn.Sequential(nn.Linear(d, self.mid_dim), nn.Tanh(),
                                         nn.Linear(self.mid_dim, L * n_kv * (hd + vd)))

    def extra_config(self) -> dict:
        return {"mid_dim": self.mid_dim}

    def _site_kv(self, s: str) -> tuple[Tensor, Tensor]:
        L, n_kv, P, hd = self.kv_shape(s)
        vd = self.value_shape(s)[-1]
        out = self.mlps[s](self.embeddings[s])  # (P, L * n_kv * (hd + vd)): per layer, keys then values
        if vd == hd:  # the layout of the paper's code: (P, L, 2, n_kv, hd)
            out = out.view(P, L, 2, n_kv, hd).permute(2, 1, 3, 0, 4)  # (2, L, n_kv, P, hd)
            return out[0], out[1]
        out = out.view(P, L, n_kv * (hd + vd))
        k = out[..., : n_kv * hd].reshape(P, L, n_kv, hd).permute(1, 2, 0, 3)
        v = out[..., n_kv * hd:].reshape(P, L, n_kv, vd).permute(1, 2, 0, 3)
        return k, v

    def key_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {s: self._batched(*self._site_kv(s)) for s in self.sites}

    def set_key_values(self, target, steps: int = 500, lr: float = 1e-3) -> dict[str, float]:
        """Fit embedding + MLP so the computed prefix reproduces `target` (mean squared error, Adam).

        The last layer's bias absorbs the mean of the target, which makes the fit converge in a few
        hundred steps even for GPT-2 activations with large offsets.
        """
        with torch.no_grad():
            for s, (k, v) in target.items():
                L, n_kv, P, hd = self.kv_shape(s)
                flat = torch.cat([k.permute(2, 0, 1, 3).reshape(P, L, -1), v.permute(2, 0, 1, 3).reshape(P, L, -1)],
                                 dim=-1).reshape(P, -1)  # (P, L * n_kv * (hd + vd)), the MLP's output layout
                self.mlps[s][2].bias.copy_(flat.mean(0))
        params = list(self.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                got = self.key_values()
                loss = sum(((got[s][0][:, 0] - k) ** 2).mean() + ((got[s][1][:, 0] - v) ** 2).mean()
                           for s, (k, v) in target.items())
                opt.zero_grad()
                loss.backward()
                opt.step()
        return fit_error(self, target)

    def inference(self) -> StaticPrefix:
        return self.to_static()

    @torch.no_grad()
    def to_static(self) -> StaticPrefix:
        """The inference prefix: the MLP's output, frozen into a static prefix (MLP dropped)."""
        static = StaticPrefix(self.geometry, self.length, self.sites).to(self.embeddings[self.sites[0]].device)
        static.set_key_values({s: (k[:, 0], v[:, 0]) for s, (k, v) in self.key_values().items()})
        return static
