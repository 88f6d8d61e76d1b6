"""Option checking shared by every constructor: clear errors, never silent."""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Iterable, Mapping


class OptionError(ValueError, TypeError):
  """A bad or unknown option. A ValueError (and a TypeError, which Python
  raises for unknown keyword arguments), so either `except` catches it."""


def reject_unknown(name: str, unknown: Mapping[str, Any], known: Iterable[str]) -> None:
  """Raises OptionError naming every unknown option, with a suggestion."""
  if not unknown:
    return
  known = sorted(known)
  parts = []
  for option in sorted(unknown):
    close = difflib.get_close_matches(option, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    parts.append(f"{option!r}{hint}")
  raise OptionError(
      f"{name}: unknown option(s) {', '.join(parts)}; known options: {', '.join(known)}")


def check_choice(name: str, field: str, value: Any, choices: Iterable[str]) -> str:
  """Returns `value` if it is one of `choices`; else OptionError naming `name` and `field`."""
  choices = tuple(choices)
  if value not in choices:
    raise OptionError(f"{name}: unknown {field} {value!r}; expected one of {choices}")
  return value


def check_positive_int(name: str, field: str, value: Any) -> int:
  """`value` as an int if it is an integer >= 1 (bool refused); else OptionError."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise OptionError(f"{name}: {field} must be an integer >= 1, got {value!r}")
  return int(value)


def check_nonnegative_float(name: str, field: str, value: Any) -> float:
  """`value` as a float if it is a finite number >= 0; else OptionError."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise OptionError(f"{name}: {field} must be a number, got {value!r}") from None
  if not v >= 0.0 or v == float("inf"):
    raise OptionError(f"{name}: {field} must be a finite number >= 0, got {value!r}")
  return v


def check_optimizer(name: str, field: str, value: Any) -> Any:
  """Returns `value` if it has `init` and `update` (an optax transformation); else OptionError."""
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise OptionError(
        f"{name}: {field} must be an optax GradientTransformation (e.g."
        f" optax.sgd(0.1)), got {type(value).__name__}")
  return value


__all__ = ["OptionError", "reject_unknown", "check_choice", "check_positive_int",
           "check_nonnegative_float", "check_optimizer"]
