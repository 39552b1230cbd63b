"""The blkstress guest's block format, recomputed in Python to check a disk image after a run.

blkstress (``domains/guests/blkstress.c``) writes block ``b`` of its working set (``bs`` bytes,
a multiple of 512, at byte ``b * bs`` of the disk) as, all little-endian::

    +0   u64 magic     MAGIC = 0x31304B4C42565349 (the bytes b"ISVBLK01")
    +8   u64 block     b
    +16  u64 gen       generation: a run-wide write counter, 1 for the run's first write
    +24  u32 checksum  word checksum of bytes [32, bs)
    +28  u32 bs        block size in bytes
    +32  payload       (bs - 32) / 8 u64 words of xorshift64

Payload: ``s = payload_seed(seed, b, gen)``; then for each word ``s ^= s << 13; s ^= s >> 7;
s ^= s << 17`` (mod 2**64) and the word is ``s``.

``payload_seed``: ``x = seed ^ (b * 0x9E3779B97F4A7C15) ^ (gen * 0xC2B2AE3D27D4EB4F)`` (mod
2**64), then the splitmix64 finalizer ``x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
x *= 0x94D049BB133111EB; x ^= x >> 31`` (mod 2**64); ``0x9E3779B97F4A7C15`` if that is 0.

Word checksum (FNV-1a over little-endian u64 words, folded to 32 bits): ``h =
0xCBF29CE484222325``; per word ``h ^= word; h = (h * 0x100000001B3) mod 2**64``; the checksum is
``(h ^ (h >> 32)) & 0xFFFFFFFF``.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = 0x31304B4C42565349
HEADER: Final = struct.Struct("<QQQII")  # magic, block, gen, checksum, bs
HEADER_BYTES: Final = HEADER.size  # 32
SECTOR_SIZE: Final = 512
MAX_BLOCK_BYTES: Final = 128 * 1024

_M64: Final = (1 << 64) - 1


def payload_seed(seed: int, block: int, gen: int) -> int:
    x = (seed ^ (block * 0x9E3779B97F4A7C15) ^ (gen * 0xC2B2AE3D27D4EB4F)) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x or 0x9E3779B97F4A7C15


def fnv1a32(data: bytes | bytearray | memoryview) -> int:
    """FNV-1a 32 over bytes: what ``blkprobe`` prints as ``sum=``."""
    h = 0x811C9DC5
    for b in bytes(data):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def word_sum(data: bytes | bytearray | memoryview) -> int:
    """The block checksum: FNV-1a over little-endian u64 words, folded to 32 bits."""
    h = 0xCBF29CE484222325
    for (w,) in struct.iter_unpack("<Q", bytes(data)):
        h = ((h ^ w) * 0x100000001B3) & _M64
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def _check_bs(bs: int) -> None:
    if bs < SECTOR_SIZE or bs % SECTOR_SIZE or bs > MAX_BLOCK_BYTES:
        raise ValueError(
            f"block size {bs} is not a multiple of {SECTOR_SIZE} in "
            f"{SECTOR_SIZE}..{MAX_BLOCK_BYTES}"
        )


def payload(seed: int, block: int, gen: int, bs: int) -> bytes:
    """Bytes [32, bs) of the block."""
    _check_bs(bs)
    s = payload_seed(seed, block, gen)
    words = []
    for _ in range((bs - HEADER_BYTES) // 8):
        s ^= (s << 13) & _M64
        s ^= s >> 7
        s ^= (s << 17) & _M64
        words.append(s)
    return struct.pack(f"<{len(words)}Q", *words)


def expected_block(seed: int, block: int, gen: int, bs: int) -> bytes:
    """The ``bs`` bytes blkstress writes for ``block`` at generation ``gen``."""
    body = payload(seed, block, gen, bs)
    return HEADER.pack(MAGIC, block, gen, word_sum(body), bs) + body


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int] | None:
    """(magic, block, gen, checksum, bs) of a block, or None if ``data`` is shorter than a
    header or the magic is not :data:`MAGIC` (e.g. a never-written, all-zero block)."""
    if len(data) < HEADER_BYTES:
        return None
    fields = HEADER.unpack_from(data)
    return fields if fields[0] == MAGIC else None


def _first_difference(a: bytes, b: bytes) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def check_block(data: bytes | bytearray | memoryview, seed: int, block: int, bs: int) -> int:
    """Check that ``data`` is block ``block`` as blkstress writes it and return its generation;
    raise AssertionError naming what is wrong otherwise."""
    data = bytes(data)
    if len(data) != bs:
        raise AssertionError(f"block {block}: {len(data)} bytes, expected {bs}")
    hdr = parse_header(data)
    if hdr is None:
        magic = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else None
        zero = not any(data)
        raise AssertionError(
            f"block {block}: bad magic {magic:#018x}, expected {MAGIC:#018x}"
            + (" (the block is all zeroes: never written?)" if zero else "")
        )
    _, hblock, gen, checksum, hbs = hdr
    if hblock != block:
        raise AssertionError(
            f"block {block}: header names block {hblock} (gen {gen}): written to the wrong place?"
        )
    if hbs != bs:
        raise AssertionError(f"block {block}: header block size {hbs}, expected {bs}")
    if gen == 0:
        raise AssertionError(f"block {block}: generation 0 (blkstress never writes it)")
    want = expected_block(seed, block, gen, bs)
    if data != want:
        off = _first_difference(data, want)
        actual = word_sum(data[HEADER_BYTES:])
        raise AssertionError(
            f"block {block} gen {gen}: first difference at byte {off} (got {data[off]:#04x}, "
            f"expected {want[off]:#04x}); {sum(x != y for x, y in zip(data, want, strict=True))}"
            f" bytes differ; stored checksum {checksum:#010x}, payload checksum {actual:#010x}, "
            f"expected {word_sum(want[HEADER_BYTES:]):#010x}"
        )
    return gen


def check_image(
    image: bytes | bytearray | memoryview, seed: int, bs: int, blocks: int
) -> dict[int, int | None]:
    """Check the first ``blocks`` blocks of a disk image: {block: generation}, None for a
    block that is all zeroes (never written).  Raises AssertionError for anything else."""
    mv = memoryview(image)
    if len(mv) < blocks * bs:
        raise AssertionError(f"image of {len(mv)} bytes is smaller than {blocks} blocks of {bs}")
    out: dict[int, int | None] = {}
    for b in range(blocks):
        chunk = mv[b * bs : (b + 1) * bs]
        out[b] = None if not any(chunk) else check_block(chunk, seed, b, bs)
    return out


def _self_check() -> None:
    blk = expected_block(7, 3, 1, 512)
    assert len(blk) == 512 and blk[:8] == b"ISVBLK01"
    assert parse_header(blk) == (MAGIC, 3, 1, word_sum(blk[32:]), 512)
    assert check_block(blk, 7, 3, 512) == 1
    assert fnv1a32(b"") == 0x811C9DC5 and fnv1a32(b"a") == 0xE40C292C
    bad = bytearray(blk)
    bad[100] ^= 1
    try:
        check_block(bad, 7, 3, 512)
    except AssertionError as e:
        assert "byte 100" in str(e), e
    else:
        raise AssertionError("a corrupted block passed")
    image = blk + bytes(512)
    assert check_image(expected_block(7, 0, 5, 512) + bytes(512), 7, 512, 2) == {0: 5, 1: None}
    assert parse_header(image[512:]) is None


if __name__ == "__main__":
    _self_check()
    print("blkdata: ok")
