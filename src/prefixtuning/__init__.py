"""Prefix-tuning of frozen language models (Li & Liang 2021) and Adaptive Prefix Tuning (Zhang et al. 2023).

    from prefixtuning import PrefixTuned
    model = PrefixTuned.from_pretrained("exports/e2e")          # an export dir or a train.py checkpoint
    model.generate([{"name": "Blue Spice", "eatType": "pub"}], num_beams=5)
    model.save_pretrained("exports/e2e-copy")
"""

__all__ = ["PrefixTuned"]


def __getattr__(name):  # the API loads torch and transformers only when it is used
    if name == "PrefixTuned":
        from .api import PrefixTuned

        return PrefixTuned
    raise AttributeError(f"module 'prefixtuning' has no attribute {name!r}")

import logging

from omegaconf import OmegaConf

from .cache import default_cache_dir


class _QuietTorchaoRegistration(logging.Filter):
    """torch's deprecation notice for each enum torchao registers at import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


# transformers imports torchao whenever it is installed (backbone.quantization needs it), and torchao's import
# warns about what a CPU build lacks (optional CUDA kernel libraries, Triton) while torch warns once per enum
# torchao registers. None of it concerns a run, and it would open every command's stderr and each run's log,
# so torchao logs errors only, and torch's notice about its enums is dropped.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").addFilter(_QuietTorchaoRegistration())


class _QuietInt8Cast(logging.Filter):
    """bitsandbytes' LLM.int8 logs that it casts float32 inputs to float16 in every matmul of every step
    (thousands of lines per run); the backbone's load line says it once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QuietInt8Cast())

# The paper's low-data runs train for 200 steps at sizes 50/100/200 and 400 steps at size 500.
LOWRES_STEPS = {50: 200, 100: 200, 200: 200, 500: 400}


def _lowres_steps(size) -> int:
    size = int(size)
    return LOWRES_STEPS.get(size, 400 if size > 200 else 200)


if not OmegaConf.has_resolver("lowres_steps"):
    OmegaConf.register_new_resolver("lowres_steps", _lowres_steps)


def _cache_dir() -> str:
    return str(default_cache_dir())


if not OmegaConf.has_resolver("prefixtuning_cache_dir"):
    OmegaConf.register_new_resolver("prefixtuning_cache_dir", _cache_dir)


def _data_root() -> str:
    return str(default_cache_dir() / "data")  # the default data root (data/download.py, `data_root`)


if not OmegaConf.has_resolver("prefixtuning_data_root"):
    OmegaConf.register_new_resolver("prefixtuning_data_root", _data_root)
