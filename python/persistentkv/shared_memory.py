"""The shared-memory ring of a StepStream, from Python (Linux on x86-64).

A router on the worker's host (or in its pod, sharing /dev/shm) can pass a StepStream's layer-steps
through shared memory instead of gRPC messages: the client creates a POSIX shared-memory object,
opens the stream with the metadata `x-pkv-shared-memory: <name>` and `x-pkv-shared-memory-ring: 1`,
writes each serialized StepRequest into the next message slot of the ring at the start of the
region (its q, k and v in the region too, the outputs asked for there) and bumps `request_seq`;
the worker answers into the same slot and bumps `response_seq`. Layout and protocol:
common/shared_memory_ring.h and "Shared memory" in proto/pkv/v1/worker.proto.

Python has no atomic read-modify-write or memory fence on shared memory. The protocol needs none
from this side: the 32-bit sequence words are written and read with single aligned stores and
loads (ctypes), which x86-64 keeps in program order with the bytes around them; after every
request the client wakes the worker's futex unconditionally (instead of reading the worker's
"waiting" flag, which would need a fence between the store and the load), and it sleeps only
through FUTEX_WAIT, whose compare in the kernel closes the race with the worker's wake-up. Other
architectures are refused (their loads and stores may be reordered).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import struct
import time

SHARED_MEMORY_KEY = "x-pkv-shared-memory"
RING_KEY = "x-pkv-shared-memory-ring"
RING_MAGIC = 0x52564B50  # "PKVR"
RING_VERSION = 1
RING_HEADER_BYTES = 4096
RING_MESSAGE_HEAD = 8  # request_bytes, response_bytes (uint32 each)

# Offsets of RingHeader's fields (each atomic word on a cache line of its own).
_SLOTS_AT = 8
_REQUEST_SEQ_AT = 64
_RESPONSE_SEQ_AT = 128
_ROUTER_WAITING_AT = 132
_CLOSED_AT = 192

_SYS_FUTEX_X86_64 = 202
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1


def supported() -> bool:
    """True where this client can drive the ring: Linux on x86-64."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if supported() else None


def _futex_wait(address: int, expected: int, timeout_s: float) -> None:
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(ctypes.c_long(_SYS_FUTEX_X86_64), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAIT),
                  ctypes.c_uint32(expected), ctypes.byref(ts), ctypes.c_void_p(0), ctypes.c_int(0))


def _futex_wake_all(address: int) -> None:
    _libc.syscall(ctypes.c_long(_SYS_FUTEX_X86_64), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE),
                  ctypes.c_int(2**31 - 1), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_int(0))


def align64(n: int) -> int:
    return (n + 63) & ~63


def message_bytes(max_rows: int, num_q_heads: int) -> int:
    """A message slot: room for a request of max_rows rows and a few thousand open / free ids,
    and for a response with the log-sum-exp of max_rows rows (as the C++ client sizes it)."""
    lse = 4 * max_rows * num_q_heads + 1024
    request = 10 * (2 * max_rows + 4096) + 1024
    return (2 * max(lse, request) + 4095) // 4096 * 4096


class Ring:
    """A shared-memory object with the ring header, `slots` message slots of `message_size`
    bytes, and `slots` tensor slots of `tensor_slot_bytes` after them. The name is unlinked by the
    worker once it has mapped the object, and by `unlink()` (idempotent) in any case."""

    def __init__(self, slots: int, message_size: int, tensor_slot_bytes: int) -> None:
        if not supported():
            raise RuntimeError(f"the shared-memory ring needs Linux on x86-64, not "
                               f"{platform.system()} on {platform.machine()}")
        self.slots = slots
        self.message_bytes = message_size
        self.tensor_base = RING_HEADER_BYTES + slots * message_size
        self.tensor_slot_bytes = tensor_slot_bytes
        self.size = self.tensor_base + slots * tensor_slot_bytes
        self.name = f"/pkv-py-{os.getpid()}-{secrets.randbits(48):x}"
        self._path: str | None = "/dev/shm" + self.name
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        struct.pack_into("<IIII", self.mm, 0, RING_MAGIC, RING_VERSION, slots, message_size)
        # Single aligned 32-bit loads and stores (a struct.pack_into may write byte by byte).
        self._request_seq = ctypes.c_uint32.from_buffer(self.mm, _REQUEST_SEQ_AT)
        self._response_seq = ctypes.c_uint32.from_buffer(self.mm, _RESPONSE_SEQ_AT)
        self._router_waiting = ctypes.c_uint32.from_buffer(self.mm, _ROUTER_WAITING_AT)
        self._closed = ctypes.c_uint32.from_buffer(self.mm, _CLOSED_AT)
        self.requested = 0  # requests published
        self.answered = 0   # responses read

    def unlink(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass  # the worker unlinked it
            self._path = None

    def message_at(self, n: int) -> int:
        return RING_HEADER_BYTES + (n % self.slots) * self.message_bytes

    def tensor_slot_at(self, n: int) -> int:
        return self.tensor_base + (n % self.slots) * self.tensor_slot_bytes

    def publish(self, payload: bytes) -> None:
        """Writes request number `requested` (a serialized StepRequest) and wakes the worker."""
        at = self.message_at(self.requested)
        room = self.message_bytes // 2 - RING_MESSAGE_HEAD
        if len(payload) > room:
            raise ValueError(f"a request of {len(payload)} bytes (rows, open, free) exceeds a ring message "
                             f"slot's {room}")
        self.mm[at + RING_MESSAGE_HEAD:at + RING_MESSAGE_HEAD + len(payload)] = payload
        struct.pack_into("<I", self.mm, at, len(payload))
        self.requested += 1
        self._request_seq.value = self.requested & 0xFFFFFFFF
        _futex_wake_all(ctypes.addressof(self._request_seq))

    def wait_response(self, spin_s: float, ended) -> bytes | None:
        """Waits for response number `answered` and returns its bytes, or None once `ended()` says
        the stream is over (or the worker closed the ring) with the response still missing."""
        current = self.answered & 0xFFFFFFFF
        word = self._response_seq
        if word.value == current:
            spin_until = time.perf_counter() + spin_s
            while word.value == current and time.perf_counter() < spin_until:
                pass
        while word.value == current:
            if ended() or self._closed.value != 0:
                if word.value == current:
                    return None
                break
            self._router_waiting.value = 1
            if word.value == current:
                _futex_wait(ctypes.addressof(word), current, 0.02)
            self._router_waiting.value = 0
        at = self.message_at(self.answered)
        (size,) = struct.unpack_from("<I", self.mm, at + 4)
        if size > self.message_bytes // 2:
            raise ValueError("unreadable response in the shared-memory ring")
        start = at + self.message_bytes // 2
        self.answered += 1
        return bytes(self.mm[start:start + size])
