"""Prefix modules: one file per kind, one registry. See `base.Prefix` for the shared contract."""

from .base import PREFIXES, Prefix, build_prefix, register_prefix
from . import static, reparam, apt, memory  # noqa: F401  (registers the kinds)

__all__ = ["PREFIXES", "Prefix", "build_prefix", "register_prefix"]
