"""Every value of train.py's composed config checked for type and range, and every key for a reader, before
any model is loaded. A key nothing reads is an error (a typo such as `+data.bach_size=4` must not be ignored).

Where a key's `Spec` comes from:
- `prefix.*`, `method.*`, `init.*`: the `settings` the selected kind declares next to its constructor
  (`Prefix.settings`, `Method.settings`, `initialization.INIT_SETTINGS`); a key another kind declares is
  refused with the kinds that read it. A new kind adds its keys in its own file, nowhere else.
- the shared groups (data, optim, decoding, ...): the table `_schema()` below (`dotted.key -> Spec`; a key
  ending in `.*` covers every key under it).
- `trainer.*`: any argument of `lightning.Trainer`, with types checked for the ones this project sets.

evaluate.py's and export.py's configs are checked by `check_eval_config` / `check_export_config`.
"""

from __future__ import annotations

import inspect
import typing

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from .artifacts import EXPORT_CHOICES
from .data.base import DATASETS
from .initialization import INIT_SETTINGS
from .lightning_module import SCHEDULES
from .nlu import is_nlu
from .nlu.model import POOLINGS
from .methods import METHODS
from .quantization import BACKENDS as QUANTIZATION_BACKENDS
from .quantization import CHOICES as QUANTIZATION
from .sharding import fsdp_available
from .prefixes import PREFIXES
from .settings import BOOL, FLOAT, INT, LIST, SPLITS, STR, ConfigError, S, Spec


def _schema() -> dict[str, Spec]:
    return {
        "task_name": S(STR), "seed": S(INT, min=0), "optimized_metric": S(STR),
        "optimized_direction": S(STR, choices=("minimize", "maximize")), "ckpt_path": S(STR, null=True),
        "resume_allow_changes": S(BOOL), "sweep_resume": S(BOOL), "validate_before_training": S(BOOL),
        "test_after_training": S(BOOL),
        "test_split": S(STR, choices=SPLITS), "test_max_inputs": S(INT, null=True, min=1),
        "test_stride": S(INT, min=1),
        "show_examples": S(INT, min=0),
        "val_generation.enabled": S(BOOL), "val_generation.split": S(STR, choices=SPLITS),
        "val_generation.max_inputs": S(INT, min=1), "val_generation.num_beams": S(INT, min=1),
        "val_generation.every_n_epochs": S(INT, min=1), "val_generation.log_samples": S(INT, min=0),
        "checkpoint.monitor": S(STR), "checkpoint.mode": S(STR, choices=("min", "max")),
        "optim.lr": S(FLOAT, above=0), "optim.lr_scale": S(FLOAT, above=0), "optim.weight_decay": S(FLOAT, min=0),
        "optim.warmup_steps": S(INT, min=0), "optim.schedule": S(STR, choices=SCHEDULES),
        "optim.gradient_clip_val": S(FLOAT, null=True, min=0), "optim.epochs": S(INT, min=1),
        "backbone.name_or_path": S(STR), "backbone.offline_substitute": S(STR, null=True),
        "backbone.dtype": S(STR, choices=("float32", "bfloat16", "float16", "auto")),
        "backbone.dropout": S(FLOAT, null=True, min=0, max=1), "backbone.gradient_checkpointing": S(BOOL),
        "backbone.cache_dir": S(STR, null=True), "backbone.quantization": S(STR, choices=QUANTIZATION),
        "backbone.quantization_backend": S(STR, choices=QUANTIZATION_BACKENDS),
        "method.kind": S(STR, choices=tuple(METHODS)), "prefix.kind": S(STR, choices=(*PREFIXES, "none")),
        "init.kind": S(STR, choices=(*INIT_SETTINGS, "none")),
        "decoding.num_beams": S(INT, min=1), "decoding.min_new_tokens": S(INT, min=0),
        "decoding.max_new_tokens": S(INT, min=1), "decoding.length_penalty": S(FLOAT),
        "decoding.no_repeat_ngram_size": S(INT, min=0), "decoding.no_newlines": S(BOOL),
        "decoding.batch_size": S(INT, min=1),
        "data.name": S(STR, choices=tuple(DATASETS)), "data.data_dir": S(STR, null=True),
        "data.files": S(dict, null=True), "data.files.*": S(STR, BOOL, null=True),
        "data.batch_size": S(INT, min=1), "data.eval_batch_size": S(INT, min=1), "data.num_workers": S(INT, min=0),
        "data.max_train_examples": S(INT, null=True, min=1), "data.max_dev_examples": S(INT, null=True, min=1),
        "data.prefix_length": S(INT, min=1), "data.download": S(BOOL),
        "data.max_source_tokens": S(INT, null=True, min=1),
        "data.max_length": S(INT, min=8), "data.task_words": S(STR), "data.dev_fraction": S(FLOAT, above=0, max=0.9),
        "head.pooling": S(STR, choices=("none", *POOLINGS)), "head.dropout": S(FLOAT, min=0, max=1),
        "lowres.enabled": S(BOOL), "lowres.size": S(INT, min=1), "lowres.sample": S(INT, min=0),
        "lowres.dev_fraction": S(FLOAT, above=0, max=1),
        "extrapolation.name": S(STR), "extrapolation.field": S(STR), "extrapolation.train": S(LIST, null=True),
        "extrapolation.test": S(LIST, null=True),
        "logger.kind": S(STR, choices=("csv", "wandb", "none")), "logger.project": S(STR),
        "logger.entity": S(STR, null=True), "logger.name": S(STR, null=True), "logger.group": S(STR, null=True),
        "logger.mode": S(STR, null=True, choices=("online", "offline", "disabled")), "logger.tags": S(LIST),
        "paths.*": S(STR, null=True),
        "recipe.name": S(STR), "recipe.row": S(STR, null=True), "recipe.lrs": S(dict, null=True),
        "recipe.lrs.*": S(FLOAT, above=0),
    }


# the groups whose keys the selected kind declares: group -> (its kind key, kind -> {key: Spec})
def _kind_settings() -> dict[str, tuple[str, dict[str, dict[str, Spec]]]]:
    return {"prefix": ("prefix.kind", {k: c.settings for k, c in PREFIXES.items()}),
            "method": ("method.kind", {k: c.settings for k, c in METHODS.items()}),
            "init": ("init.kind", INIT_SETTINGS)}


def _kind_spec(cfg, key: str) -> Spec | None:
    """The Spec the selected kind declares for `key` (prefix.*, method.*, init.*); None for other groups."""
    group, _, name = key.partition(".")
    table = _kind_settings().get(group)
    if table is None or name == "kind":
        return None
    sel, kinds = table
    selected = OmegaConf.select(cfg, sel)
    spec = kinds.get(selected, {}).get(name)
    if spec is None:
        readers = sorted(k for k, keys in kinds.items() if name in keys)
        if readers:
            raise ConfigError(f"config key {key} is read only when {sel} is {' or '.join(readers)}, but "
                              f"{sel}={selected}")
        raise ConfigError(f"config key {key} is not read by anything (a typo?); {sel}={selected} reads "
                          f"{', '.join(f'{group}.{k}' for k in kinds.get(selected, {})) or 'no other key'}")
    return spec


# keys of a group that no kind reads when the group is switched off (prefix=none, init=none)
GROUP_OFF = {"prefix": "prefix.kind", "init": "init.kind"}

def _flat(t) -> tuple:
    return tuple(x for a in typing.get_args(t) for x in (_flat(a) if typing.get_args(a) else (a,)))


# what Lightning accepts as trainer.precision (its own type), checked here before any model loads
PRECISIONS = _flat(_PRECISION_INPUT)

# Lightning Trainer arguments whose types this project relies on
TRAINER = {"max_epochs": S(INT, null=True, min=-1), "max_steps": S(INT, min=-1), "devices": S(INT, STR, LIST),
           "log_every_n_steps": S(INT, min=1), "accumulate_grad_batches": S(INT, min=1),
           "gradient_clip_val": S(FLOAT, null=True, min=0), "num_sanity_val_steps": S(INT, min=-1),
           "limit_train_batches": S(INT, FLOAT, null=True, min=0), "limit_val_batches": S(INT, FLOAT, null=True, min=0),
           "check_val_every_n_epoch": S(INT, null=True, min=1), "precision": S(STR, INT, choices=PRECISIONS),
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


def _check_keys(cfg, c: dict, schema: dict[str, Spec], what: str) -> None:
    """Every leaf of `c` has a Spec (the table, or the selected kind's settings) and satisfies it."""
    for key, value in _leaves(c):
        spec = schema.get(key) or _kind_spec(cfg, key)
        if spec is None:
            parent = key.rsplit(".", 1)[0] + ".*" if "." in key else None
            spec = schema.get(parent) if parent else None
        if spec is None:
            group = key.split(".")[0]
            known = ", ".join(k for k in schema if k.startswith(group + ".")) or "none"
            raise ConfigError(f"config key {key} is not read by {what} (a typo?); the keys of {group} are: {known}")
        spec.check(key, value)


def _plain(cfg, field_required=()) -> dict:
    for field in field_required:
        if OmegaConf.is_missing(cfg, field):
            raise ConfigError(f"{field} is required: add {field}=...")
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return c


def check_train_config(cfg) -> None:
    """Raise ConfigError for the first value of the wrong type or range, or a key nothing reads."""
    _check_lr_table(cfg)
    c = _plain(cfg)
    trainer = c.pop("trainer", {}) or {}
    _check_keys(cfg, c, _schema(), "anything")
    _check_groups(cfg)
    _check_recipe(cfg)
    _check_quantization(cfg)
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key, value in trainer.items():
        if key not in allowed:
            raise ConfigError(f"config key trainer.{key} is not an argument of lightning.Trainer")
        if key in TRAINER:
            TRAINER[key].check(f"trainer.{key}", value)
    _check_trains_something(trainer)
    _check_sharding(cfg, trainer)
    _check_task(cfg, trainer)


def _check_task(cfg, trainer: dict) -> None:
    """The NLU tasks (data=cb, ..., conll04) with a head and none of the generation tasks' settings; the generation
    tasks without a head; both before any model is loaded."""
    pooling = OmegaConf.select(cfg, "head.pooling") or "none"
    data = OmegaConf.select(cfg, "data.name")
    if not is_nlu(cfg):
        if pooling != "none":
            raise ConfigError(f"head.pooling={pooling}: data={data} is a generation task (the LM head decodes it); "
                              f"task heads are for the NLU tasks (head=none here)")
        if OmegaConf.select(cfg, "decoding.max_new_tokens") is None:
            raise ConfigError(f"decoding=none, but data={data} is decoded: choose a decoding (e.g. decoding=greedy)")
        return
    if pooling == "none":
        raise ConfigError(f"data={data} needs a task head: head=cls, pooler, mean or last")
    if OmegaConf.select(cfg, "val_generation.enabled"):
        raise ConfigError(f"val_generation.enabled=true, but data={data} decodes nothing (every validation scores "
                          f"the dev split with the task's metrics already)")
    ext = OmegaConf.select(cfg, "extrapolation.name") or "none"
    if ext != "none":
        raise ConfigError(f"extrapolation={ext} splits a generation dataset by category; data={data} has none")
    kind = OmegaConf.select(cfg, "method.kind")
    if kind == "finetune_top2":
        raise ConfigError(f"method=finetune_top2 trains an LM's top layers and LM head; with data={data} use "
                          f"method=finetune (with the head) or a parameter-efficient method")
    devices = trainer.get("devices", 1)
    if trainer.get("strategy") in ("ddp", "fsdp") or (isinstance(devices, int) and devices > 1):
        raise ConfigError(f"data={data}: the NLU tasks run in one process (their validation metrics are computed "
                          f"over the whole dev split in that process); set trainer.devices=1")


def _check_sharding(cfg, trainer: dict) -> None:
    """trainer=fsdp (strategy fsdp) with what it cannot shard: refused before any work."""
    if trainer.get("strategy") != "fsdp":
        return
    if not fsdp_available():
        raise ConfigError("trainer.strategy=fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6); this "
                          "PyTorch does not have it")
    q = OmegaConf.select(cfg, "backbone.quantization") or "none"
    if q != "none":
        raise ConfigError(f"trainer=fsdp with backbone.quantization={q}: quantized weights (torchao tensor "
                          f"subclasses, bitsandbytes parameters) are not sharded by FSDP2 here; quantize and train "
                          f"on one device per process (trainer=gpu or trainer=ddp), or shard the full-precision "
                          f"backbone (backbone.quantization=none)")


def _check_quantization(cfg) -> None:
    """A quantized backbone's weights cannot train: methods that train them are refused before any work."""
    q = OmegaConf.select(cfg, "backbone.quantization") or "none"
    kind = OmegaConf.select(cfg, "method.kind") or "prefix"
    if q != "none" and METHODS[kind].trains_backbone:
        raise ConfigError(f"method={kind} trains the backbone's own weights, which backbone.quantization={q} "
                          f"stores as frozen integers; use a method that adds weights (prefix, prompt, lora, "
                          f"adapter) or backbone.quantization=none")


def _check_trains_something(trainer: dict) -> None:
    """A run whose settings allow no optimizer step would end with a metrics.json that looks like a result.
    (optim.epochs=0 is already below its minimum; trainer.max_epochs=0 can still be set directly.)"""
    nothing = {"trainer.max_steps": trainer.get("max_steps") == 0,
               "trainer.limit_train_batches": trainer.get("limit_train_batches") in (0, 0.0),
               "trainer.max_epochs": trainer.get("max_epochs") == 0 and trainer.get("max_steps", -1) in (-1, None)}
    for key, zero in nothing.items():
        if zero:
            raise ConfigError(f"{key}=0: this run would train nothing (no optimizer step), yet write a metrics.json "
                              f"that looks like a result; to score a checkpoint use evaluate.py")


def _check_groups(cfg) -> None:
    """The prefix/ and init/ groups are read by the methods that declare them, and only by those."""
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
    prefix_kind, init_kind = OmegaConf.select(cfg, "prefix.kind"), OmegaConf.select(cfg, "init.kind")
    if (prefix_kind in PREFIXES and not PREFIXES[prefix_kind].positional
            and init_kind not in (None, "none", "random")):
        raise ConfigError(f"init={init_kind} fills prefix positions with the activations of words; prefix={prefix_kind} "
                          f"has no positions (choose init=random init.std=null: M = 0, the frozen backbone at step 0; or a small init.std)")


def _check_recipe(cfg) -> None:
    """A study other than the paper's (recipe=replay) must have settings for the chosen row: without
    conf/recipe_row/<recipe>/<row>.yaml the row would silently run with the paper's settings."""
    name, row, given = OmegaConf.select(cfg, "recipe.name"), _choice("row"), OmegaConf.select(cfg, "recipe.row")
    if given is not None and row is not None and given != row:
        raise ConfigError(f"recipe.row={given} but row={row}: recipe.row is set by conf/recipe_row/{name}/{row}.yaml, "
                          "not by hand")
    if name in (None, "paper") or given is not None:
        return
    raise ConfigError(f"recipe={name} has no settings for row={row or '?'}: add conf/recipe_row/{name}/"
                      f"{row or '<row>'}.yaml (its prefix length, init, lr) or choose a row that has one")


def _check_lr_table(cfg) -> None:
    """A study whose learning rate is looked up in recipe.lrs (per task in the NLU replays, per row and training
    size in replay_lowdata) must have an entry for this run: without one the run is refused, naming what the table
    has, rather than failing inside interpolation or training at some other lr."""
    lrs = OmegaConf.select(cfg, "recipe.lrs")
    if lrs is None:
        return
    try:
        lr = OmegaConf.select(cfg, "optim.lr")
    except InterpolationResolutionError:
        lr = None
    if lr is None:
        run = ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in ("recipe.row", "data.name", "lowres.size"))
        raise ConfigError(f"optim.lr: recipe.lrs has no learning rate for this run ({run}); it has "
                          f"{', '.join(map(str, lrs))}: choose one of those or add its lr, chosen on dev")


def _choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def _decoding_schema() -> dict[str, Spec]:
    return {k: v for k, v in _schema().items() if k.startswith(("decoding.", "paths.")) or k == "task_name"}


def check_eval_config(cfg) -> None:
    """evaluate.py's config (conf/eval.yaml), before the checkpoint is loaded."""
    c = _plain(cfg, ("ckpt",))
    schema = {**_decoding_schema(), "ckpt": S(STR), "split": S(STR, choices=SPLITS), "data_dir": S(STR, null=True),
              "max_inputs": S(INT, null=True, min=1), "stride": S(INT, min=1), "progress": S(BOOL),
              "device": S(STR), "show_examples": S(INT, min=0)}
    _check_keys(cfg, c, schema, "evaluate.py")


def check_export_config(cfg) -> None:
    """export.py's config (conf/export.yaml), before the checkpoint is loaded."""
    c = _plain(cfg, ("ckpt", "out"))
    schema = {**{k: v for k, v in _decoding_schema().items() if not k.startswith("decoding.")}, "ckpt": S(STR),
              "out": S(STR), "format": S(STR, choices=EXPORT_CHOICES)}
    _check_keys(cfg, c, schema, "export.py")
