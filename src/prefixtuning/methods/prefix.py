"""Prefix-tuning (Li & Liang 2021) and APT: the `prefix/` group's prefix, injected inside attention."""

from __future__ import annotations

from torch import Tensor

from ..prefixes import Prefix, build_prefix
from .base import Method, register_method


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
        from ..initialization import initialize_prefix

        return initialize_prefix(init_cfg, self.prefix, backbone)

    def export(self, model, out_dir, config: dict | None = None):
        """The inference prefix (reparam MLP dropped, APT gates kept), servable by the prefix bank."""
        from ..export import export_prefix

        return export_prefix(self.prefix, model.backbone, out_dir, self.shift_positions, config)

    def summary(self) -> str:
        base = f"{self.prefix.kind} prefix, P={self.prefix.length}"
        return base

    def describe(self) -> dict:
        return {"kind": "prefix", "prefix": self.prefix.describe(), "shift_positions": self.shift_positions}


    def inference_params(self, model) -> int:
        n = sum(k.numel() + v.numel() for k, v in self.prefix.key_values().values())
        if self.prefix.gated:
            n += sum(p.numel() for name, p in self.prefix.named_parameters() if name.startswith(("gate_", "layer_")))
        return n
