"""Every value of train.py's composed config checked for type and range, and every key for a reader, before
any model is loaded. One table (`SCHEMA`) says what each key may hold; a key absent from it is an error
(nothing would read it: a typo such as `+data.bach_size=4` must not be ignored).

Rules of the table: `dotted.key -> Spec`. A key ending in `.*` covers every key under it. Prefix and init
keys are checked against the kind selected (`mid_dim` only for `reparam`, `text` only for word inits).
Trainer keys are Lightning's: any argument of `lightning.Trainer` is accepted, with types checked for the
ones this project sets.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A config that cannot work; raised before any model is loaded or any training starts."""


@dataclass(frozen=True)
class Spec:
    types: tuple
    null: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    above: float | None = None  # strictly greater than

    def check(self, key: str, value: Any) -> None:
        if value is None:
            if not self.null:
                raise ConfigError(f"{key} must not be null (expected {self._what()})")
            return
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok and float in self.types and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # an int where a float is expected (lr=1 is fine)
        if not ok:
            raise ConfigError(f"{key}={value!r} is a {type(value).__name__}; expected {self._what()}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.min is not None and value < self.min:
            raise ConfigError(f"{key}={value!r} is below its minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{key}={value!r} is above its maximum {self.max}")
        if self.above is not None and value <= self.above:
            raise ConfigError(f"{key}={value!r} must be greater than {self.above}")

    def _what(self) -> str:
        names = "/".join(t.__name__ for t in self.types)
        return names + (" or null" if self.null else "")


def S(*types, **kw) -> Spec:
    return Spec(tuple(types), **kw)


INT, FLOAT, STR, BOOL, LIST = int, float, str, bool, list
SPLITS = ("train", "dev", "test")


def _schema() -> dict[str, Spec]:
    from .data.base import DATASETS
    from .initialization import INIT_KINDS
    from .methods import METHODS
    from .prefixes import PREFIXES

    return {
        "task_name": S(STR), "seed": S(INT, min=0), "optimized_metric": S(STR),
        "optimized_direction": S(STR, choices=("minimize", "maximize")), "ckpt_path": S(STR, null=True),
        "resume_allow_changes": S(BOOL), "validate_before_training": S(BOOL), "test_after_training": S(BOOL),
        "test_split": S(STR, choices=SPLITS), "test_max_inputs": S(INT, null=True, min=1),
        "test_stride": S(INT, min=1),
        "show_examples": S(INT, min=0),
        "val_generation.enabled": S(BOOL), "val_generation.split": S(STR, choices=SPLITS),
        "val_generation.max_inputs": S(INT, min=1), "val_generation.num_beams": S(INT, min=1),
        "val_generation.every_n_epochs": S(INT, min=1), "val_generation.log_samples": S(INT, min=0),
        "checkpoint.monitor": S(STR), "checkpoint.mode": S(STR, choices=("min", "max")),
        "optim.lr": S(FLOAT, above=0), "optim.lr_scale": S(FLOAT, above=0), "optim.weight_decay": S(FLOAT, min=0), "optim.warmup_steps": S(INT, min=0),
        "backbone.name_or_path": S(STR), "backbone.offline_substitute": S(STR, null=True),
        "backbone.dtype": S(STR, choices=("float32", "bfloat16", "float16")),
        "backbone.dropout": S(FLOAT, null=True, min=0, max=1), "backbone.gradient_checkpointing": S(BOOL),
        "backbone.cache_dir": S(STR, null=True),
        "method.kind": S(STR, choices=tuple(METHODS)), "method.layers": S(INT, min=1),
        "method.share": S(FLOAT, null=True, above=0, max=1), "method.bottleneck": S(INT, null=True, min=1),
        "method.activation": S(STR, choices=("relu", "gelu", "tanh")), "method.length": S(INT, min=1),
        "method.rank": S(INT, min=1), "method.alpha": S(FLOAT, above=0), "method.dropout": S(FLOAT, min=0, max=1),
        "method.targets": S(LIST, null=True),
        "prefix.kind": S(STR, choices=(*PREFIXES, "none")), "prefix.length": S(INT, min=1),
        "prefix.sites": S(LIST, null=True), "prefix.shift_positions": S(BOOL),
        "prefix.mid_dim": S(INT, min=1), "prefix.gate_init_std": S(FLOAT, min=0),
        "prefix.gate_bias_init": S(FLOAT), "prefix.dropout": S(FLOAT, min=0, max=1),
        "init.kind": S(STR, choices=(*INIT_KINDS, "none")), "init.text": S(STR), "init.std": S(FLOAT, null=True, above=0),
        "decoding.num_beams": S(INT, min=1), "decoding.min_new_tokens": S(INT, min=0),
        "decoding.max_new_tokens": S(INT, min=1), "decoding.length_penalty": S(FLOAT),
        "decoding.no_repeat_ngram_size": S(INT, min=0), "decoding.no_newlines": S(BOOL),
        "decoding.batch_size": S(INT, min=1),
        "data.name": S(STR, choices=tuple(DATASETS)), "data.data_dir": S(STR, null=True),
        "data.files": S(dict, null=True), "data.files.*": S(STR, BOOL, null=True),
        "data.batch_size": S(INT, min=1), "data.eval_batch_size": S(INT, min=1), "data.num_workers": S(INT, min=0),
        "data.max_train_examples": S(INT, null=True, min=1), "data.max_dev_examples": S(INT, null=True, min=1),
        "data.lr": S(FLOAT, above=0), "data.epochs": S(INT, min=1), "data.warmup_steps": S(INT, min=0),
        "data.prefix_length": S(INT, min=1), "data.max_source_tokens": S(INT, null=True, min=1),
        "lowres.enabled": S(BOOL), "lowres.size": S(INT, min=1), "lowres.sample": S(INT, min=0),
        "lowres.dev_fraction": S(FLOAT, above=0, max=1),
        "extrapolation.name": S(STR), "extrapolation.field": S(STR), "extrapolation.train": S(LIST, null=True),
        "extrapolation.test": S(LIST, null=True),
        "logger.kind": S(STR, choices=("csv", "wandb", "none")), "logger.project": S(STR),
        "logger.entity": S(STR, null=True), "logger.name": S(STR, null=True), "logger.group": S(STR, null=True),
        "logger.mode": S(STR, null=True, choices=("online", "offline", "disabled")), "logger.tags": S(LIST),
        "paths.*": S(STR, null=True),
    }


# keys only the selected kind reads
KIND_KEYS = {"prefix.mid_dim": ("prefix.kind", ("reparam",)), "prefix.gate_init_std": ("prefix.kind", ("apt",)),
             "prefix.gate_bias_init": ("prefix.kind", ("apt",)),
             "prefix.dropout": ("prefix.kind", ("static", "reparam", "apt")),
             "init.text": ("init.kind", ("task_words", "irrelevant_words")), "init.std": ("init.kind", ("random",)),
             "method.layers": ("method.kind", ("finetune_top2",)),
             **{f"method.{k}": ("method.kind", ("adapter",)) for k in ("share", "bottleneck", "activation")},
             "method.length": ("method.kind", ("prompt",)),
             **{f"method.{k}": ("method.kind", ("lora",)) for k in ("rank", "alpha", "dropout", "targets")}}
# keys of a group that no kind reads when the group is switched off (prefix=none, init=none)
GROUP_OFF = {"prefix": "prefix.kind", "init": "init.kind"}

# Lightning Trainer arguments whose types this project relies on
TRAINER = {"max_epochs": S(INT, null=True, min=-1), "max_steps": S(INT, min=-1), "devices": S(INT, STR, LIST),
           "log_every_n_steps": S(INT, min=1), "accumulate_grad_batches": S(INT, min=1),
           "gradient_clip_val": S(FLOAT, null=True, min=0), "num_sanity_val_steps": S(INT, min=-1),
           "limit_train_batches": S(INT, FLOAT, null=True, min=0), "limit_val_batches": S(INT, FLOAT, null=True, min=0),
           "check_val_every_n_epoch": S(INT, null=True, min=1), "precision": S(STR, INT),
           "enable_progress_bar": S(BOOL), "deterministic": S(BOOL, STR), "fast_dev_run": S(BOOL, INT)}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key == "data.files":  # checked as a whole (a mapping or null), then file by file
            yield key, v
            if isinstance(v, dict):
                yield from ((f"{key}.{name}", x) for name, x in v.items())
        elif isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def check_train_config(cfg) -> None:
    """Raise ConfigError for the first value of the wrong type or range, or a key nothing reads."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    trainer = c.pop("trainer", {}) or {}
    schema = _schema()
    for key, value in _leaves(c):
        spec = schema.get(key)
        if spec is None:
            parent = key.rsplit(".", 1)[0] + ".*" if "." in key else None
            spec = schema.get(parent) if parent else None
        if spec is None:
            raise ConfigError(f"config key {key} is not read by anything (a typo?); the keys of "
                              f"{key.split('.')[0]} are: {', '.join(k for k in schema if k.startswith(key.split('.')[0] + '.')) or 'none'}")
        if key in KIND_KEYS:
            sel, kinds = KIND_KEYS[key]
            selected = OmegaConf.select(cfg, sel)
            if selected not in kinds:
                raise ConfigError(f"config key {key} is read only when {sel} is {' or '.join(kinds)}, but "
                                  f"{sel}={selected}")
        spec.check(key, value)
    _check_groups(cfg)
    import lightning as L

    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key, value in trainer.items():
        if key not in allowed:
            raise ConfigError(f"config key trainer.{key} is not an argument of lightning.Trainer")
        if key in TRAINER:
            TRAINER[key].check(f"trainer.{key}", value)


def _check_groups(cfg) -> None:
    """The prefix/ and init/ groups are read by the methods that declare them, and only by those."""
    from .methods import METHODS

    kind = OmegaConf.select(cfg, "method.kind") or "prefix"
    reads = METHODS[kind].reads
    for group, sel in GROUP_OFF.items():
        chosen = OmegaConf.select(cfg, sel)
        if group in reads and chosen == "none":
            raise ConfigError(f"method={kind} needs the {group}/ group, but {group}=none; choose one "
                              f"(e.g. {group}={'static' if group == 'prefix' else 'task_words'})")
        if group not in reads and chosen not in (None, "none"):
            raise ConfigError(f"method={kind} does not read the {group}/ group, but {group}={chosen} was set; "
                              f"drop that override (method={kind} sets {group}=none)")
        node = OmegaConf.select(cfg, group)
        if chosen == "none" and node is not None and set(node) - {"kind"}:
            raise ConfigError(f"{group}=none, but {group}.{sorted(set(node) - {'kind'})[0]} is set: nothing reads it")
