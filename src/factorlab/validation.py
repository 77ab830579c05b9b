"""One validation rule for every config dataclass: each field's value has its annotated type.

Strings are not booleans ("false" is refused where a bool is expected), booleans are not numbers,
floats are finite, lists hold the annotated element type. Range checks (positive counts, rates in
[0, 1)) stay in each config's ``__post_init__``, next to the field they concern; this module only
makes sure they see values of the right kind. Messages name the field and cut long values short.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any

from factorlab.errors import ConfigError


def short(value: Any, limit: int = 80) -> str:
    """A repr cut to ``limit`` characters, built within that budget: a hostile value (a YAML alias
    bomb expanding to billions of items) can neither flood an error message nor take minutes and
    gigabytes to describe, as a full repr() would."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 4, 6
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_SHORT_REPR = _bounded_repr()


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        element = args[0]
        return all(_matches(v, element) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        if not args:
            return True
        key, item = args
        return all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not know: leave it to the config's own checks


def describe(hint: Any) -> str:
    if hint is float:
        return "a finite number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "true or false (a boolean, not a string)"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}" if args else "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_fields(obj: Any) -> None:
    """Raise ConfigError naming the first field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name)
        if hint is None:
            continue
        value = getattr(obj, f.name)
        if not _matches(value, hint):
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be {describe(hint)}, got {short(value)}.")


def check_ranges(
    obj: Any,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    unit_interval: tuple[str, ...] = (),
) -> None:
    """Range checks after ``check_fields``: ``positive`` > 0, ``non_negative`` >= 0, ``unit_interval``
    in [0, 1); None (an optional field left unset) passes. The message names the class and the field."""
    rules = (
        (positive, lambda v: v > 0, "must be > 0"),
        (non_negative, lambda v: v >= 0, "must be >= 0"),
        (unit_interval, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    )
    for names, ok, what in rules:
        for name in names:
            value = getattr(obj, name)
            if value is not None and not ok(value):
                raise ConfigError(f"{type(obj).__name__}.{name} {what}, got {short(value)}.")


FLOAT32_MAX = 3.4028234663852886e38


def check_lora_alpha(where: str, alpha: float, example: str = "e.g. lora_alpha=16 for r=8") -> None:
    """A LoRA alpha (its type already checked) that scales anything: not 0 (the update and B's gradient
    would be zero, an adapter that trains nothing) and inside float32's range, where the scaling
    alpha / r meets the weights (a larger one is inf there)."""
    if alpha == 0:
        raise ConfigError(f"{where} is 0, so it would train nothing; {example}.")
    if abs(alpha) > FLOAT32_MAX:
        raise ConfigError(f"{where}={short(alpha)} overflows float32, where the update is scaled; {example}.")


def check_regex(where: str, pattern: str) -> None:
    """A regular expression factorlab will match module names with: it must compile."""
    import re

    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"{where}={short(pattern)} is not a valid regular expression ({err.msg} at position {err.pos}); "
            "fix it, or escape a literal module name with re.escape()."
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}={short(pattern)} is nested too deeply to compile.") from None


def check_targeting(config: Any) -> None:
    """The regular expressions of an adapter config's targeting (a string ``target_modules`` or
    ``exclude_modules`` is one; "all-linear" is PEFT's shorthand, not a pattern)."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value != "all-linear":
            check_regex(f"{type(config).__name__}.{name}", value)
