import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# No hub in tests (a missing hub id would otherwise retry for ~46 s), W&B offline. Built backbones go to the
# same cache as every command ($PREFIXTUNING_CACHE or ~/.cache/prefixtuning), so they are built once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
# Under pytest-xdist (make test: one worker per core) each worker and the processes it starts compute on one
# thread: two workers of two OpenMP threads each on two cores spin against each other and run several times
# slower than one worker alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from prefixtuning.backbone import Backbone  # noqa: E402
from prefixtuning.model import PrefixTuningModel  # noqa: E402
from prefixtuning.prefixes import build_prefix  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def load_tiny(family: str, **kwargs) -> Backbone:
    kwargs.setdefault("dropout", 0.0)
    bb = Backbone.load(f"tiny-{family}", **kwargs)
    bb.model.eval()
    return bb


def make_model(family: str, kind: str = "static", length: int = 4, seed: int = 0, shift: bool = True,
               backbone_kwargs: dict | None = None, **prefix_kwargs) -> PrefixTuningModel:
    bb = load_tiny(family, **(backbone_kwargs or {}))
    torch.manual_seed(seed)
    prefix = build_prefix({"kind": kind, "length": length, **prefix_kwargs}, bb.geometry)
    return PrefixTuningModel(bb, prefix, shift_positions=shift)


# The fast suite trains on the tiny GPT-2 backbone, not on the root default (SmolLM2-135M), with the
# learning rate and length that suit a tiny backbone on the E2E sample. An override of the same key, an
# experiment or another dataset (which brings its own recipe) takes precedence.
TINY_RECIPE = {"backbone": "tiny-gpt2", "init": "random", "optim.lr": "1.0e-2", "data.batch_size": "16",
               "optim.epochs": "5"}


def tiny_overrides(overrides: list[str]) -> list[str]:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "experiment" in keys:
        return []
    other_data = "data" in keys
    return [f"{k}={v}" for k, v in TINY_RECIPE.items()
            if k not in keys and not (other_data and k.startswith("data."))
            and not (k == "init" and keys & {"method", "row"})]  # the method decides whether init applies


def compose_cfg(overrides: list[str], output_dir, config_name: str = "train", tiny: bool = True):
    """The composed config of train.py / evaluate.py; for train.py on the tiny backbone unless tiny=False."""
    if tiny and config_name == "train":
        overrides = tiny_overrides(overrides) + list(overrides)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = [" name : The Vaults | Type : pub | near : Café Adriatic", " name : Blue Spice | area : city centre",
         " The Mill is a coffee shop"]


def peft_prefix_twin(m):
    """HF PEFT prefix tuning on the same backbone weights (float32), its prefix set to `m`'s keys/values: the
    test oracle. PEFT's layout is (P, L * 2 * n_kv * hd), viewed as (P, layer, key|value, kv head, hd)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(m.backbone.model.name_or_path, dtype=torch.float32)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=m.prefix.length)).eval()
    k, v = m.prefix.key_values()["decoder"]  # (L, 1, n_kv, P, hd)
    L, _, H, P, hd = k.shape
    emb = peft_model.prompt_encoder["default"].embedding.weight
    assert emb.shape == (P, L * 2 * H * hd), "PEFT does not size the prefix by key/value heads"
    emb.data.copy_(torch.stack([k[:, 0], v[:, 0]], dim=1).permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * hd))
    return peft_model
