"""The frozen backbone: a Hugging Face causal or encoder-decoder LM, its tokenizer and its geometry.

Geometry (layers, heads, key/value heads, head size, positions per attention site) is read from the
model config; the user never types it. Every weight is frozen here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .injection import PrefixInjector
from .local_backbones import BackboneLoadError, build_local, is_local_backbone

# Config attributes that hold dropout probabilities in the families we support.
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout",
                   "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob")


@dataclass(frozen=True)
class SiteGeometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Geometry:
    model_type: str
    is_encoder_decoder: bool
    hidden_size: int
    max_positions: int
    sites: dict[str, SiteGeometry] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(**{**d, "sites": {k: SiteGeometry(**v) for k, v in d["sites"].items()}})

    @classmethod
    def from_config(cls, config) -> "Geometry":
        hidden = config.hidden_size
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if max_pos is None:
            raise ValueError(f"cannot read the number of positions from the {config.model_type} config")

        def site(layers: int, heads: int, kv_heads: int | None) -> SiteGeometry:
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            return SiteGeometry(layers, heads, kv_heads or heads, head_dim)

        if config.is_encoder_decoder:
            enc_heads = config.encoder_attention_heads
            dec_heads = config.decoder_attention_heads
            sites = {"encoder": site(config.encoder_layers, enc_heads, None),
                     "decoder": site(config.decoder_layers, dec_heads, None),
                     "cross": site(config.decoder_layers, dec_heads, None)}
        else:
            heads = config.num_attention_heads
            sites = {"decoder": site(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None))}
        return cls(config.model_type, bool(config.is_encoder_decoder), hidden, int(max_pos), sites)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_backbone_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """What to pass to `from_pretrained`: a local backbone's built folder, else the hub id or directory."""
    if is_local_backbone(name_or_path):
        return str(build_local(name_or_path, cache_dir))
    return name_or_path


def _load_error(name: str, err: Exception) -> BackboneLoadError:
    local = Path(name).exists()
    if local:
        return BackboneLoadError(f"could not load backbone from local directory {name!r}: {err}")
    why = ("the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1) and the model is not in the local cache"
           if hub_offline() else "it is not a local directory and could not be fetched from the Hugging Face hub")
    return BackboneLoadError(
        f"could not load backbone {name!r}: {why}. Use a local directory, pre-download the model with "
        f"network access, or pick an offline backbone such as backbone=smollm2-135m or backbone=tiny-gpt2.")


class Backbone(nn.Module):
    """Frozen LM + tokenizer + geometry + the prefix injector attached to its attention modules."""

    def __init__(self, model: nn.Module, tokenizer, name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.geometry = Geometry.from_config(model.config)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.injector = PrefixInjector(model, {s: g.n_layers for s, g in self.geometry.sites.items()})

    @property
    def is_encoder_decoder(self) -> bool:
        return self.geometry.is_encoder_decoder

    @classmethod
    def load(cls, name_or_path: str, *, offline_substitute: str | None = None, cache_dir: str | None = None,
             dtype: str = "float32", dropout: float | None = None, gradient_checkpointing: bool = False
             ) -> "Backbone":
        """Load `name_or_path` (a hub id, a local directory, or a local backbone such as `tiny-gpt2`) frozen.

        offline_substitute: a local backbone used instead when a hub id cannot be loaded (no network, not in
        the local Hugging Face cache). The backbone's `name` is then the substitute's, so checkpoints,
        exports and reports name the weights that were really used."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = resolve_backbone_path(name_or_path, cache_dir)
        try:
            try:
                config = AutoConfig.from_pretrained(path)
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as err:
                raise _load_error(path, err) from err
        except BackboneLoadError as err:
            if not offline_substitute or Path(name_or_path).exists() or is_local_backbone(name_or_path):
                raise
            print(f"[backbone] {name_or_path} is not available here ({'HF_HUB_OFFLINE=1 and ' if hub_offline() else ''}"
                  f"not in the local Hugging Face cache); using its offline substitute {offline_substitute} "
                  f"instead. Results are for {offline_substitute}, not {name_or_path}.", flush=True)
            if not is_local_backbone(offline_substitute):
                raise BackboneLoadError(f"backbone.offline_substitute={offline_substitute!r} is not a local "
                                        f"backbone") from err
            return cls.load(offline_substitute, cache_dir=cache_dir, dtype=dtype, dropout=dropout,
                            gradient_checkpointing=gradient_checkpointing)
        if dropout is not None:
            for f in _DROPOUT_FIELDS:
                if hasattr(config, f):
                    setattr(config, f, float(dropout))
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        try:
            model = auto.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
        except OSError as err:
            raise _load_error(path, err) from err
        if tokenizer.pad_token is None:  # GPT-2 ships without one; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(model, tokenizer, name_or_path)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
