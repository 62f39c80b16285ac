"""Typed, range-checked method options (`algorithm.options`).

Each strategy declares its options as `option_spec = {"name": Option(...)}`; the strategy's
constructor checks the user's values against it, and `assembly.setup` builds the strategy once
before the model loads, so a wrong type or an out-of-range value is a one-line error (exit 2)
before anything is written, not a crash in round 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Option:
    default: Any
    kind: type | tuple  # bool, int, float, or a tuple of allowed strings
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # True: `low` itself is excluded
    nullable: bool = False  # None allowed (the default derived from the model)

    def check(self, field: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        if isinstance(self.kind, tuple):
            if value not in self.kind:
                raise ConfigError(f"{field}: must be one of {', '.join(self.kind)}, got {value!r}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{field}: expected true or false, got {value!r}")
            return value
        if self.kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            noun = "an integer" if self.kind is int else "a number"
            raise ConfigError(f"{field}: expected {noun}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{field}: must be finite, got {value!r}")
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and value > self.high
        if below or above:
            raise ConfigError(f"{field}: must be {self._range()}, got {value!r}")
        return self.kind(value)

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"<= {self.high}"


def check_options(method: str, options: dict, spec: dict[str, Option]) -> dict[str, Any]:
    """Defaults completed by the user's values, each checked; unknown names refused."""
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise ConfigError(f"algorithm.options.{unknown[0]}: unknown option for {method} "
                          f"(allowed: {', '.join(sorted(spec)) or 'none'})")
    values = {name: option.default for name, option in spec.items()}
    for name, value in options.items():
        values[name] = spec[name].check(f"algorithm.options.{name}", value)
    return values
