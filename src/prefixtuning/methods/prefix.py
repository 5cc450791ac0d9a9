"""Prefix-tuning (Li & Liang 2021) and APT: the `prefix/` group's prefix, injected inside attention."""

from __future__ import annotations

from torch import Tensor

from ..artifacts import PREFIX_EXPORT
from ..initialization import initialize_prefix
from ..prefixes import PREFIXES, Prefix, build_prefix
from .base import Method, NoPrefixError, register_method


@register_method("prefix")
class PrefixMethod(Method):
    reads = ("prefix", "init")

    def __init__(self, backbone, prefix_cfg: dict | None = None, prefix: Prefix | None = None,
                 shift_positions: bool | None = None):
        super().__init__(backbone)
        if prefix is None:
            pcfg = dict(prefix_cfg or {})
            shift = pcfg.pop("shift_positions", True)
            prefix = build_prefix(pcfg, backbone.geometry)
        else:
            shift = True
        if shift_positions is not None:
            shift = shift_positions
        self.prefix = prefix
        # real tokens of a decoder-only backbone start at position P, as in the paper's code and in PEFT
        # (where the prefix sits in the cache); False starts them at 0, freeing P positions of context
        self.shift_positions = bool(shift)

    def position_offset(self, backbone) -> int:
        return self.prefix.length if self.shift_positions and not backbone.is_encoder_decoder else 0

    def activate(self, backbone, source_mask: Tensor | None, keep_gates: bool = False) -> None:
        state = self.prefix.state(source_mask)
        state.keep_gates = keep_gates
        backbone.injector.activate(state)

    def after_generate(self, num_beams: int) -> None:
        if self.prefix.gated and num_beams > 1:  # gates were computed on beam-expanded rows: one per example
            self.prefix.last_token_gates = {k: g[::num_beams] for k, g in self.prefix.last_token_gates.items()}

    def initialize(self, init_cfg: dict, backbone) -> dict:
        return initialize_prefix(init_cfg, self.prefix, backbone)

    # ---------------------------------------------------------------- the prefix
    def prefix_module(self) -> Prefix:
        return self.prefix

    def set_prefix(self, prefix: Prefix) -> None:
        self.prefix = prefix

    @property
    def gated(self) -> bool:
        return self.prefix.gated

    def gated_prefix(self) -> Prefix:
        if not self.prefix.gated:
            raise NoPrefixError(f"the gate probe needs an APT prefix (prefix=apt); this model has a "
                                f"{self.prefix.kind} prefix")
        return self.prefix

    # ---------------------------------------------------------------- export and rebuild
    # The inference prefix (reparam's MLP dropped, APT's gates kept), servable by the prefix bank.
    export_format = PREFIX_EXPORT

    def export_payload(self, model) -> tuple[dict[str, Tensor], dict]:
        served = self.prefix.inference()
        tensors = served.export_tensors()
        return tensors, {"kind": served.kind, "trained_kind": self.prefix.kind, "length": served.length,
                         "sites": served.sites, "settings": served.extra_config(), "shift_positions": self.shift_positions,
                         "dtype": str(next(iter(tensors.values())).dtype)}

    @classmethod
    def from_export(cls, backbone, method_cfg, prefix_cfg, meta, tensors, source) -> "PrefixMethod":
        return cls(backbone, prefix=load_exported_prefix(backbone.geometry, meta, tensors, source),
                   shift_positions=meta.get("shift_positions", True))

    def restore(self, model, tensors, source) -> None:
        """Nothing left to load: `from_export` rebuilt the prefix from the tensors."""

    def summary(self) -> str:
        return self.prefix.summary()

    def describe(self) -> dict:
        return {"kind": "prefix", "prefix": self.prefix.describe(), "shift_positions": self.shift_positions}

    def inference_params(self, model) -> int:
        """What serving holds: the tensors the prefix kind exports (APT's gates included), or, for a kind
        exported through its inference prefix (reparam), that prefix's keys and values. Counted without
        building the inference prefix, which would draw from the run's random stream."""
        if not self.prefix.exported:
            return sum(k.numel() + v.numel() for k, v in self.prefix.key_values().values())
        return sum(t.numel() for t in self.prefix.export_tensors().values())


def load_exported_prefix(geometry, meta: dict, tensors, source: str) -> Prefix:
    """The served prefix of a prefix export (its kind rebuilds itself from the tensors it declared)."""
    cls = PREFIXES.get(meta.get("kind"))
    if cls is None or not cls.exported:
        raise ValueError(f"{source}: exported prefix kind {meta.get('kind')!r} is not one of "
                         f"{', '.join(k for k, c in sorted(PREFIXES.items()) if c.exported)}")
    return cls.from_export(geometry, meta["length"], meta["sites"], tensors, source, meta.get("settings"))
