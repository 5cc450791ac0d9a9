"""Backbone + training method + task head: the NLU model (P-tuning v2's setting: the head trains with the prefix).

The backbone runs exactly as in generation (`method.prepare`, `method.activate`: the prefix, APT's gates, LoRA,
adapters, prompt vectors act through the same code); its last hidden states go to the head instead of an LM head:

    pooling (the `head/` group)  cls: the first token's state | pooler: BERT's own pooler on it (P-tuning v2's
                                 classifiers) | mean: the mean over real tokens | last: the last real token
                                 (decoder-only backbones, which see the whole input only there)
    classification   dropout(pooled) -> Linear(d, labels)
    multiple_choice  dropout(pooled of each (context, choice)) -> Linear(d, 1), softmax over the choices
    span             dropout([pooled; mean of span 1's tokens; mean of span 2's tokens]) -> Linear(3d, labels)
    tagging          dropout(each token's state) -> Linear(d, labels); the loss on first sub-tokens only

Loss: cross-entropy, a mean over inputs (tagging: over labelled tokens); `loss_tokens` counts them for
data-parallel weighting, as TunedModel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.features import IGNORE
from ..errors import UserError
from ..injection import masked_mean
from ..model import real_positions
from .tasks import NLUTask

POOLINGS = ("cls", "pooler", "mean", "last")


class HeadError(UserError, ValueError):
    pass


class TaskHead(nn.Module):
    def __init__(self, kind: str, hidden: int, n_labels: int, pooling: str, dropout: float):
        super().__init__()
        if pooling not in POOLINGS:
            raise HeadError(f"head.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        self.kind, self.pooling = kind, pooling
        self.dropout = nn.Dropout(float(dropout))
        n_in = 3 * hidden if kind == "span" else hidden
        self.classifier = nn.Linear(n_in, 1 if kind == "multiple_choice" else n_labels)

    def pool(self, hidden: Tensor, mask: Tensor, pooler: nn.Module | None) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            return pooler(hidden)
        if self.pooling == "mean":
            return masked_mean(hidden, mask)
        last = mask.long().cumsum(-1).argmax(-1)  # the last real position of each right-padded row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, hidden: Tensor, mask: Tensor, batch: dict, pooler: nn.Module | None) -> Tensor:
        if self.kind == "tagging":
            return self.classifier(self.dropout(hidden))  # (B, T, labels)
        pooled = self.pool(hidden, mask, pooler)
        if self.kind == "span":
            spans = batch["span_masks"].to(hidden.dtype)  # (B, 2, T)
            spans = spans[..., : hidden.shape[1]]
            span_means = torch.einsum("bst,btd->bsd", spans, hidden) / spans.sum(-1, keepdim=True).clamp(min=1)
            pooled = torch.cat([pooled, span_means.flatten(1)], dim=-1)  # (B, 3d)
        return self.classifier(self.dropout(pooled))


class NLUModel(nn.Module):
    """`TunedModel`'s counterpart for the NLU tasks: the same backbone and method objects, plus a head."""

    def __init__(self, backbone, method, task: NLUTask, pooling: str, dropout: float):
        super().__init__()
        if backbone.is_encoder_decoder:
            raise HeadError(f"data={task.name}: the NLU heads read an encoder or a decoder-only model's hidden states; "
                            f"{backbone.name} is an encoder-decoder (not supported for these tasks)")
        if not backbone.is_encoder_only and pooling in ("cls", "pooler"):
            raise HeadError(f"head.pooling={pooling} on the decoder-only {backbone.name}: its first token has seen "
                            f"nothing of the input; use head=last (or head=mean)")
        if pooling == "pooler" and getattr(backbone.model, "pooler", None) is None:
            raise HeadError(f"head.pooling=pooler, but {backbone.name} has no pooler layer; use head=cls or head=mean")
        self.backbone, self.method, self.task = backbone, method, task
        # where a family's first real token sits: 0, or padding_idx + 1 for RoBERTa-style embeddings (which number
        # positions after the padding index); the prefix's positions (P-tuning v2: the cache's length) come on top
        pad = getattr(getattr(backbone.model.base_model, "embeddings", None), "padding_idx", None)
        self.position_base = pad + 1 if isinstance(pad, int) else 0
        self.head = TaskHead(task.kind, backbone.geometry.hidden_size, len(task.labels), pooling, dropout)

    # the TunedModel surface the Lightning module, checkpoints and reports use
    @property
    def prefix(self):
        return self.method.prefix_module()

    def identity(self) -> dict:
        return {**self.backbone.identity(), "method": self.method.describe(), "task": self.describe_task()}

    def describe_task(self) -> dict:
        return {"name": self.task.name, "kind": self.task.kind, "labels": list(self.task.labels),
                "pooling": self.head.pooling}

    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, T, d) last hidden states of the real tokens, with the method active."""
        bb = self.backbone
        inputs = self.method.prepare(bb, input_ids, attention_mask, None)
        mask = inputs.pop("attention_mask")
        inputs.pop("labels")
        self.method.activate(bb, attention_mask)  # APT's gates pool over the whole input
        extra = {"position_ids": real_positions(mask, self.method.position_offset(bb) + self.position_base)}
        if token_type_ids is not None:
            extra["token_type_ids"] = F.pad(token_type_ids, (mask.shape[1] - token_type_ids.shape[1], 0))
        out = bb.model.base_model(**inputs, attention_mask=mask, use_cache=False, **extra)
        return out.last_hidden_state[:, -input_ids.shape[1]:]  # without a prompt method's leading vectors

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                token_type_ids: Tensor | None = None, **batch):
        shape = input_ids.shape
        flat = (lambda t: t.reshape(-1, t.shape[-1])) if len(shape) == 3 else (lambda t: t)
        tt = flat(token_type_ids) if token_type_ids is not None else None
        hidden = self.encode(flat(input_ids), flat(attention_mask), tt)
        pooler = getattr(self.backbone.model, "pooler", None)
        logits = self.head(hidden, flat(attention_mask), batch, pooler)
        if len(shape) == 3:  # multiple choice: one score per (input, choice)
            logits = logits.view(shape[0], shape[1])
        out = _Output(logits=logits)
        if labels is not None:
            flat_logits = logits.float().reshape(-1, logits.shape[-1])
            out.loss = F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=IGNORE)
            out.loss_tokens = (labels != IGNORE).sum()
        return out

    @torch.no_grad()
    def predict(self, batch: dict) -> Tensor:
        """Predicted label indices: (B,) or, for tagging, (B, T)."""
        b = {k: v for k, v in batch.items() if k not in ("labels", "word_index")}
        return self(**b).logits.argmax(-1)


class _Output:
    def __init__(self, logits: Tensor):
        self.logits, self.loss, self.loss_tokens = logits, None, None
