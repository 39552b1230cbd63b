"""Typed tables: the one checker for ``supervisor.toml`` and domain configs.

A table's keys are declared as :class:`Field` (a type, a help text, an optional check);
:func:`check_table` refuses unknown keys (with the nearest allowed one), wrong types and values
its check rejects, with a :class:`ConfigError` naming the file, the key and what is allowed
(Firecracker's ``deny_unknown_fields``).  The kernel re-validates what crosses the control
socket with the same declarations, so this module imports nothing above ``ipc/``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """A configuration file or value is wrong; the message says where and what to do."""


# --- small typed field checker -------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    help: str
    check: Callable[[Any], str | None] | None = None


def in_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def at_least(lo: float, *, exclusive: bool = False) -> Callable[[Any], str | None]:
    if exclusive:
        return lambda v: None if v > lo else f"must be greater than {lo:g}"
    return lambda v: None if v >= lo else f"must be at least {lo:g}"


def check_name(v: str) -> str | None:
    return None if NAME_RE.match(v) else (
        "must start with a letter or digit and contain only letters, digits, '_', '.', '-' "
        "(at most 63 characters)")


def check_table(where: str, table: dict[str, Any], fields: dict[str, Field],
                 required: tuple[str, ...] = ()) -> None:
    for key, val in table.items():
        f = fields.get(key)
        if f is None:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}{did}; allowed keys: "
                              f"{', '.join(sorted(fields))}")
        kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
        if not isinstance(val, kinds) or (isinstance(val, bool) and bool not in kinds):
            words = [k for k in kinds if not (k is int and float in kinds)]  # "a number"
            want = " or ".join(type_word(k) for k in words)
            raise ConfigError(f"{where}: key {key!r} must be {want} ({f.help}), "
                              f"got {type_word(type(val))} {val!r}")
        if f.check is not None and (msg := f.check(val)) is not None:
            raise ConfigError(f"{where}: key {key!r} = {val!r} {msg} ({f.help})")
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}: missing required key {key!r} ({fields[key].help})")


def type_word(t: type) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", list: "a list",
            dict: "a table", float: "a number"}.get(t, t.__name__)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
