"""Typed settings: what a config key may hold (`Spec`), and the error every config check raises. Light on purpose:
each prefix kind, method and initialization declares its own keys with these, next to its constructor
(`settings = {"mid_dim": S(INT, min=1)}`), and `config_check` reads them from the registries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError


class ConfigError(UserError, ValueError):
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
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            raise ConfigError(f"{key}={value!r} is not a finite number")
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
