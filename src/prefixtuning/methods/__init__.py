"""Training methods: one file per method, one registry. See `base.Method` for the shared contract."""

from .base import METHODS, Method, NoPrefixError, build_method, register_method
from . import prefix, finetune, adapter, prompt, lora  # noqa: F401  (registers the methods)

__all__ = ["METHODS", "Method", "NoPrefixError", "build_method", "register_method"]
