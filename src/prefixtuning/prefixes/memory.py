"""PrefixMemory-Tuning (Wang et al., ICLR 2026; arXiv 2506.13674, first titled Prefix-Tuning+): the prefix taken out
of the softmax.

With a prefix s_1..s_P in front of the keys, the output of attention for query q_i is a convex combination of the
prefix's contribution and the input's, weighted by the two sums of sim(q_i, k) = exp(q_i . k / sqrt(d)): the longer
the input, the smaller the prefix's weight, and the reverse. The paper writes the prefix's (unnormalized)
contribution with a kernel feature map, sum_j phi(q_i)^T phi(k_j) v_j^T = phi(q_i)^T M with M = sum_j phi(k_j) v_j^T,
drops the coupling normalization, and trains M itself:

    o_i = Attention(q_i, K, V) + phi(q_i)^T M

so the term no longer shrinks as the input grows, and M (F x d_v) is not bounded by a number of prefix positions.

What this implementation does, and the choices the paper leaves open (also in docs/methods.md):
- One M per attention layer and per key/value head of every site the prefix reaches (decoder self-attention for
  decoder-only models; encoder, decoder and cross sites of encoder-decoders unless `prefix.sites` narrows them);
  the query heads of a grouped-query group read their group's M, as they read its keys and values (the prefix
  it replaces lived in those heads). SmolLM2-135M: 30 layers x 3 kv heads x 64 x 64 = 368,640 parameters.
- phi is applied to the query as the attention receives it (after the rotary embedding), elementwise, so F is the
  head size. `feature_map`: `elu1` (elu(x) + 1, the positive map of linear attention; the default), `elu`,
  `relu`, `identity`. The public code (github haonan3/PrefixMemory-Tuning) could not be read from this project's
  machines; which map it uses is not checked here.
- M starts at zero (`init_std: 0.0`): step 0 is the frozen backbone exactly, and the gradient reaching M,
  sum_i phi(q_i) (dL/do_i)^T, is not zero. `init=random init.std=s` draws M ~ N(0, s^2) instead. Word
  initializations (task_words) are refused: a memory has no key/value positions to fill from words.
- The term is added to each head's output before the output projection, at training and at every decoding step
  (it depends on the current query only: nothing enters the cache and no position is taken, so `length` is 0 and
  the real tokens start at position 0).
- `prefix.dropout` drops entries of M during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..injection import PrefixState
from ..settings import FLOAT, STR, S
from .base import Prefix, register_prefix

FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1.0,
    "elu": F.elu,
    "relu": F.relu,
    "identity": lambda x: x,
}


@register_prefix("memory")
class MemoryPrefix(Prefix):
    positional = False
    exported = ("memory",)
    # no `length` (nothing takes positions) and no `shift_positions` (nothing to shift past)
    settings = {"sites": Prefix.settings["sites"], "dropout": Prefix.settings["dropout"],
                "feature_map": S(STR, choices=tuple(FEATURE_MAPS)), "init_std": S(FLOAT, min=0)}

    def __init__(self, geometry, length: int | None = None, sites=None, feature_map: str = "elu1",
                 init_std: float = 0.0, dropout: float = 0.0):
        if length not in (None, 0):
            raise ValueError(f"prefix.length={length} does not apply to the memory kind: it puts no positions in "
                             f"front of the keys (its size is the head size, per layer and kv head)")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"prefix.feature_map={feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
        super().__init__(geometry, 0, sites, dropout=dropout)
        self.feature_map = feature_map
        self.init_std = float(init_std)
        self.memory = nn.ParameterDict()
        for s in self.sites:
            g = geometry.sites[s]
            m = torch.zeros(g.n_layers, g.n_kv_heads, g.head_dim, g.v_dim)  # (L, n_kv, F = hd, value hd)
            if self.init_std > 0:
                m.normal_(0.0, self.init_std)
            self.memory[s] = nn.Parameter(m)

    def phi(self, x: Tensor) -> Tensor:
        return FEATURE_MAPS[self.feature_map](x)

    def key_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {}  # nothing in front of the keys

    def memories(self) -> dict[str, Tensor]:
        """site -> M, (n_layers, 1, n_kv_heads, F, value head size): one memory shared by the batch."""
        return {s: self.memory[s].unsqueeze(1) for s in self.sites}

    def state(self, source_mask: Tensor | None = None) -> PrefixState:
        mem = self.memories()
        if self.training and self.dropout > 0:
            mem = {s: F.dropout(m, self.dropout, True) for s, m in mem.items()}
        return PrefixState(kv={}, memory=mem, feature_map=self.phi, source_mask=source_mask)

    def set_key_values(self, target):
        raise ValueError("a memory prefix has no key/value positions to initialize from words; use init=random "
                         "(M = 0, or init.std=s for N(0, s^2))")

    @torch.no_grad()
    def reset_random(self, std: float) -> bool:
        for s in self.sites:
            self.memory[s].normal_(0.0, std)
        return True

    def summary(self) -> str:
        return f"memory prefix (M per layer and kv head, phi={self.feature_map}; no positions)"

    def extra_config(self) -> dict:
        return {"feature_map": self.feature_map}
