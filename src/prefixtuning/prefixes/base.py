"""What every prefix kind provides, and the registry that maps `prefix.kind` to a class."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Geometry
from ..injection import PrefixState
from ..settings import BOOL, FLOAT, INT, LIST, S

PREFIXES: dict[str, type["Prefix"]] = {}


def register_prefix(kind: str):
    def deco(cls):
        cls.kind = kind
        PREFIXES[kind] = cls
        return cls
    return deco


class Prefix(nn.Module):
    """A trainable prefix for every attention site of a backbone.

    Subclasses implement `key_values()`, returning for each site a pair (keys, values), each of shape
    (n_layers, 1, n_kv_heads, P, head_dim) (values: value head size): one prefix shared by the batch (the injector broadcasts the
    row). Gated kinds also implement `gate(site, layer, pooled)`.
    """

    kind = "base"
    gated = False
    # The ParameterDicts (keyed by site) an export of this kind holds, written as `<site>.<name>`; a kind
    # with none (reparam) exports its `inference()` prefix instead.
    exported: tuple[str, ...] = ()
    # The `prefix.*` config keys this kind reads (checked before any work by config_check); subclasses extend.
    # shift_positions is read by the prefix method (where real tokens start), for every kind.
    settings = {"length": S(INT, min=1), "sites": S(LIST, null=True), "dropout": S(FLOAT, min=0, max=1),
                "shift_positions": S(BOOL)}

    # Whether the kind puts P key/value positions in front of each attention's keys (every kind but `memory`,
    # whose length is 0: it occupies no positions and shifts no token).
    positional = True

    def __init__(self, geometry: Geometry, length: int, sites: Iterable[str] | None = None, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"prefix.dropout must be in [0, 1), got {dropout}")
        # dropout on the prefix keys and values during training (P-Tuning v2 uses 0.1); a training setting,
        # not part of the prefix's identity
        self.dropout = float(dropout)
        if self.positional and length < 1:
            raise ValueError(f"prefix.length must be at least 1, got {length}")
        self.geometry = geometry
        self.length = int(length)
        all_sites = list(geometry.sites)
        self.sites = list(sites) if sites else all_sites
        unknown = [s for s in self.sites if s not in geometry.sites]
        if unknown:
            raise ValueError(f"prefix.sites {unknown} do not exist in a {geometry.model_type} backbone "
                             f"(it has {all_sites})")

    def kv_shape(self, site: str) -> tuple[int, int, int, int]:
        """(L, n_kv, P, key head size): the keys of a site."""
        g = self.geometry.sites[site]
        return (g.n_layers, g.n_kv_heads, self.length, g.head_dim)

    def value_shape(self, site: str) -> tuple[int, int, int, int]:
        """(L, n_kv, P, value head size): the values, wider or narrower than the keys under multi-head latent
        attention (DeepSeek-V2/V3), the same shape everywhere else."""
        g = self.geometry.sites[site]
        return (g.n_layers, g.n_kv_heads, self.length, g.v_dim)

    def key_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def set_key_values(self, target: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
        """Make `key_values()` equal `target` (shapes as `kv_shape` without the batch dim). Returns fit error."""
        raise NotImplementedError

    def state(self, source_mask: Tensor | None = None) -> PrefixState:
        kv = self.key_values()
        if self.training and self.dropout > 0:
            kv = {s: (F.dropout(k, self.dropout, True), F.dropout(v, self.dropout, True)) for s, (k, v) in kv.items()}
        return PrefixState(kv=kv, gate_fn=self.gate if self.gated else None, source_mask=source_mask)

    def gate(self, site: str, layer: int, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_config(self) -> dict:
        return {}

    # ---------------------------------------------------------------- export and rebuild
    def inference(self) -> "Prefix":
        """The prefix as served: itself, or a cheaper equivalent (reparam: its computed prefix, MLP dropped)."""
        return self

    def export_tensors(self) -> dict[str, Tensor]:
        """`<site>.<name>` -> tensor for every name in `exported`: what `from_export` rebuilds this kind from."""
        if not self.exported:
            raise TypeError(f"prefix kind {self.kind!r} is exported through its inference() prefix")
        return {f"{site}.{name}": getattr(self, name)[site].detach() for site in self.sites for name in self.exported}

    @classmethod
    def from_export(cls, geometry: Geometry, length: int, sites, tensors: dict[str, Tensor], source: str,
                    settings: dict | None = None) -> "Prefix":
        """The prefix of an export, on `geometry`; errors name the file and what does not fit. `settings` are the
        kind's `extra_config()` as exported (memory: its feature map), passed back to its constructor."""
        try:
            prefix = cls(geometry, length, sites, **(settings or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: a {cls.kind} prefix cannot be built from the exported settings "
                             f"{settings}: {err}") from None
        want = {f"{site}.{name}" for site in prefix.sites for name in cls.exported}
        if set(tensors) != want:
            raise ValueError(f"{source}: a {cls.kind} prefix holds {sorted(want)}, the file has {sorted(tensors)}")
        state = {f"{name}.{site}": tensors[f"{site}.{name}"] for site in prefix.sites for name in cls.exported}
        try:
            prefix.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{source}: tensors do not match the declared geometry: {err}") from None
        return prefix

    @torch.no_grad()
    def reset_random(self, std: float) -> bool:
        """Redraw the trainable tensors ~ N(0, std^2); False where the kind keeps its own initialization."""
        return False

    def summary(self) -> str:
        return f"{self.kind} prefix, P={self.length}"

    def describe(self) -> dict:
        return {"kind": self.kind, "length": self.length, "sites": self.sites, **self.extra_config()}

    @staticmethod
    def _batched(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k.unsqueeze(1), v.unsqueeze(1)  # (L, n_kv, P, hd) -> (L, 1, n_kv, P, hd)


def build_prefix(cfg, geometry: Geometry) -> Prefix:
    """Instantiate `cfg.kind` from the registry with the rest of `cfg` as keyword arguments."""
    params = {k: v for k, v in dict(cfg).items() if k != "kind"}
    kind = cfg["kind"]
    if kind not in PREFIXES:
        raise ValueError(f"prefix.kind={kind!r} is not registered; choose one of {', '.join(sorted(PREFIXES))}")
    if params.get("sites") is not None:
        params["sites"] = list(params["sites"])
    return PREFIXES[kind](geometry, **params)


def fit_error(prefix: Prefix, target: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    got = prefix.key_values()
    with torch.no_grad():
        return {s: max((got[s][0][:, 0] - k).abs().max().item(), (got[s][1][:, 0] - v).abs().max().item())
                for s, (k, v) in target.items()}
