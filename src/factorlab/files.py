"""Reading files a user hands factorlab (adapter configs, relations files, cell summaries) with limits
that hold whatever the file holds.

A path may name a folder, a pipe or a device instead of a file; a file may be huge, not UTF-8, nested
a thousand levels deep, or a YAML "billion laughs" whose aliases expand a few hundred bytes into
billions of values. Every reader here checks the path is a regular file of bounded size before
opening it, parses with the safe YAML loader, and walks the parsed value with a budget (counting
aliased values each time they are reached), so none of these costs more than the limit, and each is
an error of the caller's kind naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from factorlab.errors import ConfigError, FactorlabError, explain

MAX_VALUES = 200_000  # values (list items, mapping entries, scalars) a parsed file may expand to
MAX_DEPTH = 64  # nesting levels


def read_text(
    path: str | os.PathLike, what: str, max_bytes: int, error: type[FactorlabError] = ConfigError
) -> str:
    """The UTF-8 text of ``path``, which must be a regular file of at most ``max_bytes`` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise error(str(explain(err, what))) from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what}: {path} is a folder where a file is expected; pass the file itself.")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what}: {path} is not a regular file (a pipe, socket or device); pass a file.")
    if info.st_size > max_bytes:
        raise error(f"{what}: {path} is {info.st_size:,} bytes; at most {_mb(max_bytes)} are read.")
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)  # the file may grow between stat and read
    except OSError as err:
        raise error(str(explain(err, what))) from None
    if len(data) > max_bytes:
        raise error(f"{what}: {path} is over {max_bytes:,} bytes; at most {_mb(max_bytes)} are read.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what}: {path} is not UTF-8 text (byte {err.start}); is it the right file?") from None


def parse(text: str, fmt: str, what: str, error: type[FactorlabError] = ConfigError) -> Any:
    """``text`` parsed as "json" or "yaml" (safe loader: no Python tags), then checked by
    :func:`check_size`."""
    try:
        if fmt == "yaml":
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except RecursionError:
        raise error(f"{what}: nested too deeply to read.") from None
    except Exception as err:  # yaml.YAMLError, JSONDecodeError: a malformed file
        raise error(f"{what}: not valid {fmt.upper()}: {_first_line(err)}") from None
    check_size(data, what, error)
    return data


def read_structured(
    path: str | os.PathLike, what: str, max_bytes: int, error: type[FactorlabError] = ConfigError
) -> Any:
    """A JSON or YAML file (by suffix: .yaml/.yml is YAML, anything else JSON), read within limits."""
    path = Path(path)
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "json"
    return parse(read_text(path, what, max_bytes, error), fmt, what, error)


def check_size(
    data: Any,
    what: str,
    error: type[FactorlabError] = ConfigError,
    max_values: int = MAX_VALUES,
    max_depth: int = MAX_DEPTH,
) -> None:
    """Refuse a parsed value that expands to more than ``max_values`` values or nests deeper than
    ``max_depth``. Shared (aliased) parts count every time they are reached, as any later walk over
    the value (a type check, a message) would reach them; the walk stops at the budget."""
    budget = max_values
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise error(
                f"{what}: expands to more than {max_values:,} values (YAML aliases repeating a value?); "
                "write the values out, or split the file."
            )
        if depth > max_depth:
            raise error(f"{what}: nested deeper than {max_depth} levels.")
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:g} MB)"


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."
