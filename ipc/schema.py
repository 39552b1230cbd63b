"""Typed tables: the one checker for ``supervisor.toml``, domain configs and campaign plans.

A table's keys are declared as :class:`Field` (a type, a help text, optional choices, an optional
check, a default); :func:`table_problem` finds the first unknown key (with the nearest allowed
one), wrong type, non-finite number, value outside the choices or value the check rejects, and
says so in one sentence that names the key, spells the value as TOML would and gives the key's
help, e.g. ``watchdog_sec = 0.05 must be 0 (off) or at least 0.1 (heartbeat deadline in
seconds, 0 = off)``.  :func:`check_table` raises it as a :class:`ConfigError` after the file's
name (Firecracker's ``deny_unknown_fields``); a campaign plan puts its ``file:line: [table]``
before the same sentence (``isovisor/campaign/plan.py``).  The kernel re-validates what crosses
the control socket with the same declarations, so this module imports nothing above ``ipc/``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_BARE_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(Exception):
    """A configuration file or value is wrong; the message says where and what to do."""


# --- fields ------------------------------------------------------------------------------------

#: The kind of a key that takes an integer or a float (stored as a float).
NUMBER: Final = (float, int)


@dataclass(frozen=True)
class Field:
    """One key of a table.

    ``kind`` is the Python type of the TOML value (``NUMBER`` for an integer or a float; a bool
    is only accepted where ``kind`` names ``bool``).  ``choices``, when given, are the allowed
    values and ``what`` names one of them ("a fault type": ``type = "sigkil" is not a fault
    type; choose one of: ...``).  ``check`` returns what is wrong with a value of the right
    type ("must be at least 0"), or None.  ``default`` is the value when the key is absent
    (None: no value, or one computed elsewhere); dataclasses that hold a table take their
    defaults from it, so each key's default is declared once.
    """

    kind: type | tuple[type, ...]
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()
    what: str = ""
    default: Any = None

    def __post_init__(self) -> None:
        if self.choices and not self.what:
            raise ValueError(f"a Field with choices needs 'what' ({self.help})")

    @property
    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    @property
    def is_number(self) -> bool:
        """An integer or a float, stored as a float."""
        return float in self.kinds


# --- checks: each returns what is wrong with a value, or None ----------------------------------


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {_num(lo)} and {_num(hi)}"


def at_least(lo: float, *, exclusive: bool = False) -> Callable[[Any], str | None]:
    if exclusive:
        return lambda v: None if v > lo else f"must be more than {_num(lo)}"
    return lambda v: None if v >= lo else f"must be at least {_num(lo)}"


def at_most_bytes(limit: int) -> Callable[[str], str | None]:
    return lambda v: None if len(v.encode()) <= limit else f"is too long: at most {limit} bytes"


#: The environment variable the supervisor sets, for every process of its stack, to the
#: stack's name.
STACK_ENV: Final = "ISOVISOR_STACK"


def check_name(v: str) -> str | None:
    return (
        None
        if NAME_RE.match(v)
        else (
            "must start with a letter or digit and contain only letters, digits, '_', '.', '-' "
            "(at most 63 characters)"
        )
    )


# --- messages ----------------------------------------------------------------------------------


def show(v: Any) -> str:
    """A value as TOML would spell it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{show_key(k)} = {show(x)}" for k, x in v.items()) + " }"
    return str(v)


def show_key(key: str) -> str:
    """A key as TOML would spell it (quoted unless it is a bare key)."""
    return key if _BARE_KEY_RE.match(key) else json.dumps(key, ensure_ascii=False)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the closest of ``options``, or ""."""
    hint = difflib.get_close_matches(word, list(options), n=1)
    return f' (did you mean "{hint[0]}"?)' if hint else ""


def _want_word(f: Field) -> str:
    if f.is_number:
        return "a number" + "".join(f" or {_WANT[k]}" for k in f.kinds if k not in (float, int))
    return " or ".join(_WANT.get(k, k.__name__) for k in f.kinds)


_WANT: Final[dict[type, str]] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}


def _got_word(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), "a date/time")


def value_problem(key: str, val: Any, f: Field) -> str | None:
    """What is wrong with ``key = val`` for the field ``f``, as one sentence, or None."""
    shown = f"{show_key(key)} = {show(val)}"
    kinds = f.kinds
    if not isinstance(val, kinds) or (isinstance(val, bool) and bool not in kinds):
        return f"{shown} must be {_want_word(f)} ({f.help}), got {_got_word(val)}"
    if isinstance(val, float) and not math.isfinite(val):
        return f"{shown} must be a finite number ({f.help})"
    if f.choices and val not in f.choices:
        hint = did_you_mean(val, f.choices) if isinstance(val, str) else ""
        return f"{shown} is not {f.what}; choose one of: {', '.join(f.choices)}{hint} ({f.help})"
    if f.check is not None and (msg := f.check(val)) is not None:
        return f"{shown} {msg} ({f.help})"
    return None


def table_problem(
    table: dict[str, Any], fields: dict[str, Field], required: tuple[str, ...] = ()
) -> tuple[str | None, str] | None:
    """The first thing wrong with ``table``: (the key it is about, or None; the sentence)."""
    for key, val in table.items():
        f = fields.get(key)
        if f is None:
            return key, (
                f'unknown key "{key}"{did_you_mean(key, fields)}; allowed keys: {", ".join(fields)}'
            )
        if (msg := value_problem(key, val, f)) is not None:
            return key, msg
    for key in required:
        if key not in table:
            return None, f'missing required key "{key}" ({fields[key].help})'
    return None


def check_table(
    where: str, table: dict[str, Any], fields: dict[str, Field], required: tuple[str, ...] = ()
) -> None:
    """Raise :class:`ConfigError` ``where: <what is wrong>`` for the table's first mistake."""
    if (problem := table_problem(table, fields, required)) is not None:
        raise ConfigError(f"{where}: {problem[1]}")


def typed(table: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """A checked table with its numbers (``NUMBER`` fields) as floats."""
    return {k: float(v) if k in fields and fields[k].is_number else v for k, v in table.items()}


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
