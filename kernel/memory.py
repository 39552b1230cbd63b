"""Guest physical memory: one shared-memory segment per domain, mapped into unicorn.

The kernel reads and writes guest RAM through a memoryview of the same segment unicorn maps with
``mem_map_ptr``, so hypercall arguments cost a memory load, not a unicorn API call.  Every
guest-supplied address goes through :meth:`GuestMemory.check` first: a guest can name only its
own RAM, and page 0 (the NULL guard) is never part of it.
"""

from __future__ import annotations

from ipc.shm import Segment
from kernel import abi


class GuestMemory:
    """RAM of one domain: guest-physical [0, size) with page 0 unmapped."""

    def __init__(self, shm_name: str, size: int, *, reserve_later: bool = False) -> None:
        if size % abi.PAGE_SIZE:
            raise ValueError(f"guest memory size {size} is not a multiple of {abi.PAGE_SIZE}")
        self.size = size
        self.segment = Segment(shm_name, size, create=True, reserve_later=reserve_later)
        self.bytes = memoryview(self.segment.buf)
        self.words = self.bytes.cast("Q")  # u64 view for the hypercall block and start info

    @property
    def host_address(self) -> int:
        return self.segment.address

    def check(self, gpa: int, length: int) -> bool:
        """True if [gpa, gpa+length) lies inside guest RAM (excluding the NULL guard page)."""
        return length >= 0 and gpa >= abi.NULL_GUARD_END and gpa + length <= self.size

    def read(self, gpa: int, length: int) -> bytes:
        if not self.check(gpa, length):
            raise IndexError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")
        return bytes(self.bytes[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        if not self.check(gpa, len(data)):
            raise IndexError(f"guest range {gpa:#x}+{len(data):#x} is outside guest RAM")
        self.bytes[gpa : gpa + len(data)] = data

    def close(self) -> None:
        """Release the mapping and remove the segment.  Unicorn must have unmapped it first."""
        self.words.release()
        self.bytes.release()
        self.segment.close()
        self.segment.unlink()
