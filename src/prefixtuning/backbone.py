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

from .injection import PrefixInjector, UnsupportedArchitecture
from .local_backbones import BackboneLoadError, build_local, is_local_backbone
from .quantization import (QuantizationError, bitsandbytes_config, keep_differentiable, quantize_backbone,
                           quantized_modules, resolve_backend)

# Config attributes that hold dropout probabilities in the families we support.
_DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout",
                   "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob")


@dataclass(frozen=True)
class SiteGeometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # of the keys (and of the queries)
    value_dim: int | None = None  # of the values, where it differs from the keys' (multi-head latent attention)

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim


def _first(config, names: tuple[str, ...], what: str, default=None):
    """The first of `names` the config sets (not None); `default` or a refusal naming the fields tried."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    if default is not None:
        return default
    raise UnsupportedArchitecture(f"{config.model_type}: cannot read the {what} from its config (none of "
                                  f"{', '.join(names)} is set); this family is not supported")


# encoder-only families (BERT and its descendants): one attention site, `encoder`, loaded with AutoModel (no LM
# head; the NLU heads of nlu/heads.py read its hidden states). Whether a family's attention goes through
# transformers' attention interface is checked by the probe, as for every family: DeBERTa-v2/v3's disentangled
# attention computes its scores in its own code and is refused there, naming the class.
ENCODER_ONLY = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "distilbert",
                "albert", "mpnet", "ernie", "modernbert")

# families whose positions are relative (a bias or ALiBi), so a sequence has no maximum length of its own:
# config fields that say so, and families whose config does not
_RELATIVE = ("relative_attention_num_buckets", "alibi")
_RELATIVE_FAMILIES = ("bloom",)


@dataclass(frozen=True)
class Geometry:
    model_type: str
    is_encoder_decoder: bool
    hidden_size: int
    max_positions: int | None  # None: relative positions, no maximum
    sites: dict[str, SiteGeometry] = field(default_factory=dict)

    @property
    def is_encoder_only(self) -> bool:
        return not self.is_encoder_decoder and "encoder" in self.sites

    def fits(self, n_positions: int) -> bool:
        """Whether a sequence spanning `n_positions` positions fits (always, for relative positions)."""
        return self.max_positions is None or n_positions <= self.max_positions

    def to_dict(self) -> dict:
        d = asdict(self)
        for g in d["sites"].values():  # as recorded before value_dim existed, when keys and values agree
            if g["value_dim"] is None:
                del g["value_dim"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(**{**d, "sites": {k: SiteGeometry(**v) for k, v in d["sites"].items()}})

    @classmethod
    def from_config(cls, config) -> "Geometry":
        """Layers, heads, key/value heads and head sizes per attention site, read from the config of any
        family; `Backbone` then checks them against the shapes the attention really sees (`check_observed`)."""
        hidden = _first(config, ("hidden_size", "d_model", "n_embd"), "hidden size")
        max_pos = None
        if config.model_type not in _RELATIVE_FAMILIES and not any(getattr(config, r, None) for r in _RELATIVE):
            max_pos = int(_first(config, ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
                                 "number of positions"))

        def site(layers: int, heads: int) -> SiteGeometry:
            kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
            if kv is None and getattr(config, "multi_query", False):
                kv = 1
            qk = getattr(config, "qk_head_dim", None)  # multi-head latent attention (DeepSeek-V2/V3)
            head_dim = qk or _first(config, ("head_dim", "d_kv"), "head size", default=hidden // heads)
            value_dim = getattr(config, "v_head_dim", None)
            return SiteGeometry(int(layers), int(heads), int(kv or heads), int(head_dim),
                                None if value_dim in (None, head_dim) else int(value_dim))

        if config.is_encoder_decoder:
            enc_layers = _first(config, ("encoder_layers", "num_layers"), "number of encoder layers")
            dec_layers = _first(config, ("decoder_layers", "num_decoder_layers", "num_layers"),
                                "number of decoder layers")
            enc_heads = _first(config, ("encoder_attention_heads", "num_heads", "num_attention_heads"),
                               "number of encoder heads")
            dec_heads = _first(config, ("decoder_attention_heads", "num_heads", "num_attention_heads"),
                               "number of decoder heads")
            sites = {"encoder": site(enc_layers, enc_heads), "decoder": site(dec_layers, dec_heads),
                     "cross": site(dec_layers, dec_heads)}
        else:
            layers = _first(config, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")
            heads = _first(config, ("num_attention_heads", "n_head", "num_heads"), "number of heads")
            sites = {"encoder" if config.model_type in ENCODER_ONLY else "decoder": site(layers, heads)}
        return cls(config.model_type, bool(config.is_encoder_decoder), int(hidden), max_pos, sites)

    def check_observed(self, observed: dict) -> None:
        """The shapes the probe saw (`PrefixInjector.probe`: (site, layer) -> query, key, value shapes) agree
        with this geometry at every layer; a prefix sized from a wrong reading is refused, never broadcast."""
        for (site, layer), (q, k, v) in sorted(observed.items()):
            g = self.sites[site]
            seen = {"heads": q[1], "key/value heads": k[1], "key head size": k[-1], "value head size": v[-1]}
            want = {"heads": g.n_heads, "key/value heads": g.n_kv_heads, "key head size": g.head_dim,
                    "value head size": g.v_dim}
            for what in seen:
                if seen[what] != want[what]:
                    raise UnsupportedArchitecture(
                        f"{self.model_type}: its config gives {site} layer {layer} {want[what]} {what}, but the "
                        f"attention computes with {seen[what]}; a prefix of the config's shape would not fit "
                        f"(per-layer or unusual head geometry is not supported)")


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


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has native bfloat16 matrix kernels on this CPU (AVX512-BF16 / AMX, or AVX-512 emulation).
    Without them a bfloat16 backward pass falls to a reference path: measured 104 s against 1.7 s in float32
    for one SmolLM2 batch of 8 on a 2-core AVX2 AMD EPYC."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_dtype(dtype: str, accelerator: str | None = None) -> tuple[str, str]:
    """(dtype, why) for backbone.dtype; `auto` is bfloat16 on a GPU or a CPU with bfloat16 kernels, else
    float32. `accelerator`: the run's trainer.accelerator when known (cpu forces the CPU rule)."""
    if dtype != "auto":
        return dtype, "backbone.dtype"
    if accelerator not in ("cpu",) and torch.cuda.is_available():
        return "bfloat16", "backbone.dtype=auto on a CUDA GPU"
    if cpu_has_bf16_kernels():
        return "bfloat16", "backbone.dtype=auto on a CPU with bfloat16 kernels"
    return "float32", ("backbone.dtype=auto on a CPU without bfloat16 matrix kernels (no AVX512-BF16 / AMX): "
                       "bfloat16 would be tens of times slower here")


class Backbone(nn.Module):
    """Frozen LM + tokenizer + geometry + the prefix injector attached to its attention modules."""

    def __init__(self, model: nn.Module, tokenizer, name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.quantization = "none"  # set by load(); not part of the identity (a prefix fits the full-precision model)
        self.quantization_backend = "none"
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.geometry = Geometry.from_config(model.config)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.injector = PrefixInjector(model, {s: g.n_layers for s, g in self.geometry.sites.items()})
        # every layer's attention is reached by the prefix function and sees the geometry read from the
        # config, or the family is refused here, before any data or training work
        self.geometry.check_observed(self.injector.probe(model))

    @property
    def is_encoder_decoder(self) -> bool:
        return self.geometry.is_encoder_decoder

    @property
    def is_encoder_only(self) -> bool:
        """BERT-family encoders: no LM head, no generation; the NLU tasks (nlu/) read their hidden states."""
        return self.geometry.is_encoder_only

    def identity(self) -> dict:
        """What an artifact records of its backbone and every loader checks (artifacts.check_identity)."""
        return {"backbone": self.name, "geometry": self.geometry.to_dict()}

    @classmethod
    def load(cls, name_or_path: str, *, offline_substitute: str | None = None, cache_dir: str | None = None,
             dtype: str = "float32", dropout: float | None = None, gradient_checkpointing: bool = False,
             quantization: str = "none", accelerator: str | None = None,
             quantization_backend: str = "auto") -> "Backbone":
        """Load `name_or_path` (a hub id, a local directory, or a local backbone such as `tiny-gpt2`) frozen.

        offline_substitute: a local backbone used instead when a hub id cannot be loaded (no network, not in
        the local Hugging Face cache). The backbone's `name` is then the substitute's, so checkpoints,
        exports and reports name the weights that were really used."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

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
                            gradient_checkpointing=gradient_checkpointing, quantization=quantization,
                            accelerator=accelerator, quantization_backend=quantization_backend)
        if dropout is not None:
            for f in _DROPOUT_FIELDS:
                if hasattr(config, f):
                    setattr(config, f, float(dropout))
        auto = (AutoModelForSeq2SeqLM if config.is_encoder_decoder
                else AutoModel if config.model_type in ENCODER_ONLY else AutoModelForCausalLM)
        dtype, why = resolve_dtype(dtype, accelerator)
        if why != "backbone.dtype":
            print(f"[backbone] {why}: {dtype}", flush=True)
        on_cuda = torch.cuda.is_available() and (accelerator or "auto") in ("auto", "gpu", "cuda")
        backend = resolve_backend(quantization, quantization_backend, on_cuda)
        extra = {}
        if backend == "bitsandbytes":  # loaded straight into quantized storage, on the device it runs on
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_cuda else "cpu"
            extra = {"quantization_config": bitsandbytes_config(quantization, getattr(torch, dtype)),
                     "device_map": {"": device}}
        try:
            model = auto.from_pretrained(path, config=config, dtype=getattr(torch, dtype), **extra)
        except OSError as err:
            raise _load_error(path, err) from err
        if tokenizer.pad_token is None:  # GPT-2 ships without one; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if backend == "torchao":
            n = quantize_backbone(model, quantization, name_or_path)
        else:
            n = len(quantized_modules(model))
            if backend == "bitsandbytes":
                if not n:
                    raise QuantizationError(f"backbone.quantization={quantization}: bitsandbytes quantized no "
                                            f"projection of {name_or_path}")
                keep_differentiable(model)  # no inference-only CPU kernel: gradients must reach the prefix
        backbone = cls(model, tokenizer, name_or_path)
        backbone.quantization = quantization
        backbone.quantization_backend = backend
        backbone.dtype = dtype
        if n:
            how = {"torchao": "weight-only, torchao", "bitsandbytes": "bitsandbytes, " + (
                "LLM.int8: activations cast to float16 and quantized per row in each matmul" if quantization == "int8"
                else "NF4")}[backend]
            print(f"[backbone] {name_or_path}: {n} linear projections quantized to {quantization} ({how}); "
                  f"embeddings and LM head kept in {dtype}", flush=True)
        return backbone

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
