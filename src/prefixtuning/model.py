"""Backbone + prefix as one module: the forward pass and `generate` with the prefix injected."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone
from .data.features import IGNORE
from .methods import Method
from .methods.prefix import PrefixMethod
from .prefixes import Prefix
from .sharding import gathered_method_tensors


def real_positions(attention_mask: Tensor, offset) -> Tensor:
    """(B, T) positions of a left- or right-padded batch: each row's real tokens count from `offset`
    (an int, or a (B,) tensor of per-row offsets); padding positions are clamped to the offset."""
    if isinstance(offset, Tensor):
        offset = offset[:, None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def _accepts(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


class TunedModel(nn.Module):
    """Frozen backbone + a training method (`methods/`): the forward pass and `generate`.

    `TunedModel(backbone, prefix)` with a Prefix builds the prefix method (`shift_positions`: real tokens of
    a decoder-only backbone start at position P, as in the paper's code and in PEFT; False starts them at 0).
    """

    def __init__(self, backbone: Backbone, method, shift_positions: bool = True, target_logits_only: bool = True):
        super().__init__()
        if isinstance(method, Prefix):
            method = PrefixMethod(backbone, prefix=method, shift_positions=shift_positions)
        if not isinstance(method, Method):
            raise TypeError(f"expected a Prefix or a Method, got {type(method).__name__}")
        self.backbone = backbone
        self.method = method
        # With labels, a decoder-only backbone computes vocabulary logits only at positions that predict
        # a target token (`logits_to_keep`), not at source positions whose loss is masked anyway: the same
        # loss, a smaller LM-head matmul and no logits to store for the source. `.logits` then holds only
        # those positions; call without labels for logits everywhere.
        self.target_logits_only = bool(target_logits_only) and _accepts(backbone.model, "logits_to_keep")

    @property
    def prefix(self) -> Prefix:
        """The prefix method's prefix (NoPrefixError, an AttributeError, for the other methods)."""
        return self.method.prefix_module()

    def __setattr__(self, name, value):
        if name == "prefix":  # swap the prefix of the prefix method (nn.Module would bypass a property setter)
            self.method.set_prefix(value)
            return
        super().__setattr__(name, value)

    @property
    def shift_positions(self) -> bool:
        return self.method.shift_positions

    def identity(self) -> dict:
        """What checkpoints and exports record and every loader checks (artifacts.check_identity)."""
        return {**self.backbone.identity(), "method": self.method.describe()}

    @property
    def position_offset(self) -> int:
        return self.method.position_offset(self.backbone)

    def position_ids(self, attention_mask: Tensor) -> Tensor:
        """(B, T) positions of a (left- or right-) padded batch: real tokens count from the offset."""
        return real_positions(attention_mask, self.position_offset)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                source_mask: Tensor | None = None, **kwargs):
        bb = self.backbone
        inputs = self.method.prepare(bb, input_ids, attention_mask, labels)
        self.method.activate(bb, source_mask if source_mask is not None else attention_mask)
        mask, labels = inputs.pop("attention_mask"), inputs.pop("labels")
        if bb.is_encoder_decoder:
            out = bb.model(**inputs, attention_mask=mask, labels=labels, use_cache=False, **kwargs)
            return _count_targets(out, labels)
        kwargs.setdefault("position_ids", self.position_ids(mask))
        if labels is None or not self.target_logits_only:
            out = bb.model(**inputs, attention_mask=mask, labels=labels, use_cache=False, **kwargs)
            return _count_targets(out, None if labels is None else labels[:, 1:])
        next_labels = labels[:, 1:]  # position t predicts token t + 1
        keep = (next_labels != IGNORE).any(0).nonzero().squeeze(-1)  # positions predicting a target in any row
        out = bb.model(**inputs, attention_mask=mask, use_cache=False, logits_to_keep=keep, **kwargs)
        logits = out.logits.float()  # (B, K, V), upcast as transformers' own causal-LM loss does
        out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), next_labels[:, keep].reshape(-1),
                                   ignore_index=IGNORE)
        return _count_targets(out, next_labels)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, **generate_kwargs) -> Tensor:
        """HF `generate` (greedy, sampling or beam search) with the method active; decoder-only prompts are
        left-padded. Returns only the new tokens for decoder-only backbones."""
        bb = self.backbone
        inputs = self.method.prepare(bb, input_ids, attention_mask, None)
        mask = inputs.pop("attention_mask")
        inputs.pop("labels")
        with gathered_method_tensors(self) as distributed:
            if distributed:  # trainer=fsdp: every rank runs every step until all ranks are done
                generate_kwargs.setdefault("synced_gpus", True)
            # the prompt is the source: APT gates pool it at prefill and keep their values
            self.method.activate(bb, attention_mask, keep_gates=True)
            try:
                if not bb.is_encoder_decoder:
                    generate_kwargs.setdefault("position_ids", self.position_ids(mask))
                out = bb.model.generate(**inputs, attention_mask=mask, **generate_kwargs)
            finally:
                self.method.deactivate(bb)
        self.method.after_generate(generate_kwargs.get("num_beams") or 1)
        if not bb.is_encoder_decoder and not self.method.generates_from_embeddings:
            out = out[:, input_ids.shape[1]:]
        return out


def _count_targets(out, predicted_labels: Tensor | None):
    """`out.loss_tokens`: how many target tokens `out.loss` is the mean over (what data-parallel training weights
    each rank's loss by, lightning_module._global_token_mean)."""
    out.loss_tokens = None if predicted_labels is None else (predicted_labels != IGNORE).sum()
    return out


# The project's name for it; every method goes through the same class.
PrefixTuningModel = TunedModel
