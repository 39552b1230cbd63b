"""xl-style device strings (``"key=value, key=value"``): split and check the keys, with errors
that name the entry, the key, and the nearest allowed key; and sizes like ``64M``."""

from __future__ import annotations

import difflib
import re
from typing import Final


def parse_kv(
    spec: str, keys: tuple[str, ...], what: str, where: str, example: str
) -> dict[str, str]:
    """``"target=a.img, vdev=xvda"`` -> ``{"target": "a.img", "vdev": "xvda"}``.  ValueError
    for a part that is not key=value, an unknown key (with a did-you-mean) or a repeated
    one; ``what`` ("disk", "vif") and ``example`` go into the messages."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not eq:
            raise ValueError(
                f"{where}: {part!r} is not key=value; isovisor accepts only the "
                f'key=value form, e.g. "{example}"'
            )
        if key not in keys:
            hint = difflib.get_close_matches(key, keys, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"{where}: unknown {what} key {key!r}{did}; allowed: {', '.join(keys)}"
            )
        if key in fields:
            raise ValueError(f"{where}: {what} key {key!r} is given twice")
        fields[key] = val
    return fields


_SIZE_RE: Final = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int | None:
    """``64M`` -> 67108864 (binary units K, M, G, T; plain digits are bytes)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        return None
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
