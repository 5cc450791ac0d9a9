"""Prompt tuning (Lester et al. 2021; the paper's embedding-only ablation EMB): P trainable vectors
prepended to the input embeddings (the encoder's input for an encoder-decoder). Unlike a prefix, they reach
the upper layers only through the frozen network. They take positions 0..P-1, so real tokens start at P,
as with a shifted prefix.

Initialization (`init/`): random (N(0, s^2), s = the std of the backbone's embedding table), or the
embeddings of real words, tiled to P, as for prefixes: task words or irrelevant words.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.features import IGNORE
from ..initialization import tile_ids
from ..settings import INT, S
from .base import Method, register_method


@register_method("prompt")
class PromptMethod(Method):
    reads = ("init",)
    settings = {"length": S(INT, min=1)}
    generates_from_embeddings = True

    def __init__(self, backbone, length: int = 5):
        super().__init__(backbone, length=int(length))
        if length < 1:
            raise ValueError(f"method.length must be at least 1, got {length}")
        emb = backbone.model.get_input_embeddings().weight
        self.prompt = nn.Parameter(torch.randn(int(length), emb.shape[1]) * emb.detach().float().std())  # (P, d)

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def positions_taken(self, backbone) -> int:
        return self.length  # decoder-only: before the tokens; encoder-decoder: in the encoder input

    def prepare(self, backbone, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> dict:
        B, P = input_ids.shape[0], self.length
        tokens = backbone.model.get_input_embeddings()(input_ids)  # (B, T, d), scaled as the model scales them
        prompt = self.prompt.to(tokens.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, P, d)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        out = {"inputs_embeds": torch.cat([prompt, tokens], dim=1), "attention_mask": mask, "labels": labels}
        if labels is not None and not backbone.is_encoder_decoder:  # the prompt predicts nothing
            out["labels"] = torch.cat([labels.new_full((B, P), IGNORE), labels], dim=1)
        return out

    @torch.no_grad()
    def initialize(self, init_cfg: dict, backbone) -> dict:
        kind = init_cfg["kind"]
        emb = backbone.model.get_input_embeddings()
        if kind == "random":
            self.prompt.normal_(0.0, float(emb.weight.float().std()))
            return {"init": "random", "std": float(emb.weight.float().std())}
        ids = tile_ids(backbone.tokenizer(init_cfg["text"], add_special_tokens=False)["input_ids"], self.length)
        self.prompt.copy_(emb(torch.tensor(ids, device=self.prompt.device)).float())
        return {"init": kind, "text": init_cfg["text"]}

    def summary(self) -> str:
        return f"prompt of {self.length} input vectors"
