"""Data the guest programs generate, recomputed in Python to check their results."""

from __future__ import annotations


def xorshift_bytes(n: int, seed: int) -> bytes:
    """The bytes the crc32 guest hashes: xorshift64 (13, 7, 17), low byte of each state."""
    mask = (1 << 64) - 1
    s = seed or 1
    out = bytearray(n)
    for i in range(n):
        s ^= (s << 13) & mask
        s ^= s >> 7
        s ^= (s << 17) & mask
        out[i] = s & 0xFF
    return bytes(out)
