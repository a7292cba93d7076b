"""Thin ctypes bindings to the system libbpf for what bcc's Python API lacks.

bcc compiles and loads the programs; pins, links and raw map access by file descriptor come from
here, so read-only commands can open pinned maps without compiling or creating anything.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

_LIB = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

BPF_ANY = 0
BPF_F_MMAPABLE = 1 << 10  # map_flags of an ARRAY whose values user space may mmap

_LIB.bpf_obj_get.argtypes = [ct.c_char_p]
_LIB.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_LIB.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_LIB.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_LIB.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_LIB.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_LIB.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]
_LIB.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
_LIB.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_LIB.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
_LIB.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
_LIB.bpf_link_detach.argtypes = [ct.c_int]
_LIB.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
_LIB.bpf_enable_stats.argtypes = [ct.c_int]

BPF_STATS_RUN_TIME = 0


class BpfError(OSError):
    """A bpf(2) operation failed; errno tells why."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        # libbpf 1.x returns -errno and also sets errno.
        code = -ret if ret < -1 else ct.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


def obj_get(path: str) -> int:
    """Opens a pinned object; raises BpfError (ENOENT when there is no pin)."""
    return _check(_LIB.bpf_obj_get(path.encode()), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_LIB.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def map_lookup(fd: int, key: ct.Structure | ct._SimpleCData, value: ct.Structure | ct._SimpleCData) -> bool:
    ret = _LIB.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    if ret < 0 and ct.get_errno() == errno.ENOENT:
        return False
    _check(ret, "map lookup")
    return True


def map_update(fd: int, key: ct.Structure | ct._SimpleCData, value: ct.Structure | ct._SimpleCData,
               flags: int = BPF_ANY) -> None:
    _check(_LIB.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "map update")


def map_update_batch(fd: int, keys: ct.Array, values: ct.Array, count: int) -> tuple[int, BpfError | None]:
    """Writes the first `count` keys and values (BPF_MAP_UPDATE_BATCH, flags BPF_ANY) in one
    syscall instead of one each.

    The kernel writes them in order and stops at the first that fails, so the result is how many
    were written, all of them unless an error is returned too; the elements past that point are
    untouched. No element is written in part: each is one ordinary update.
    """
    if count == 0:
        return 0, None
    if count > len(keys) or count > len(values):
        raise ValueError(f"batch of {count} from arrays of {len(keys)} keys and {len(values)} values")
    done = ct.c_uint32(count)
    ret = _LIB.bpf_map_update_batch(fd, keys, values, ct.byref(done), None)
    if ret >= 0:
        return count, None
    code = -ret if ret < -1 else ct.get_errno()
    # The kernel sets the count to the elements written before the failure, but an error it
    # finds before the first (flags, an op the map lacks) leaves the count as it was passed in:
    # then nothing was written. Saying so when all were (a count that could not be copied
    # back) only makes the caller write them again.
    written = done.value if done.value < count else 0
    return written, BpfError(code, f"map update batch: {os.strerror(code)}")


def map_delete(fd: int, key: ct.Structure | ct._SimpleCData) -> bool:
    ret = _LIB.bpf_map_delete_elem(fd, ct.byref(key))
    if ret < 0 and ct.get_errno() == errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def map_next_key(fd: int, key: ct.Structure | None, next_key: ct.Structure) -> bool:
    ret = _LIB.bpf_map_get_next_key(fd, ct.byref(key) if key is not None else None, ct.byref(next_key))
    if ret < 0 and ct.get_errno() == errno.ENOENT:
        return False
    _check(ret, "map next key")
    return True


def array_read_all(fd: int, leaf: type, max_entries: int, *, chunk: int = 4096) -> ct.Array:
    """Every element of an ARRAY map, in index order, with BPF_MAP_LOOKUP_BATCH: a few
    syscalls instead of one per element."""
    leaves = (leaf * max_entries)()
    keys = (ct.c_uint32 * chunk)()
    cursor = ct.c_uint32(0)
    done = 0
    while done < max_entries:
        count = ct.c_uint32(min(chunk, max_entries - done))
        ret = _LIB.bpf_map_lookup_batch(fd, ct.byref(cursor) if done else None, ct.byref(cursor), keys,
                                        ct.byref(leaves, done * ct.sizeof(leaf)), ct.byref(count), None)
        # The last batch ends with ENOENT (libbpf 1.x returns -errno and also sets errno).
        if ret < 0 and (-ret if ret < -1 else ct.get_errno()) != errno.ENOENT:
            _check(ret, "map lookup batch")
        done += count.value
        if ret < 0 or count.value == 0:
            break
    if done != max_entries:
        raise BpfError(errno.EIO, f"map lookup batch: read {done} of {max_entries} elements")
    return leaves


class _MapInfo(ct.Structure):
    # struct bpf_map_info (uapi/linux/bpf.h), the leading fields we read.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
        ("_rest", ct.c_uint8 * 64),
    ]


class _LinkInfo(ct.Structure):
    # struct bpf_link_info for a cgroup link: type, id, prog_id, then the cgroup union member.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("prog_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("attach_type", ct.c_uint32),
        ("_rest", ct.c_uint8 * 64),
    ]


class _ProgInfo(ct.Structure):
    # struct bpf_prog_info, up to and including name.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
        ("_rest", ct.c_uint8 * 256),
    ]


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    cgroup_id: int
    attach_type: int


def _info(fd: int, info: ct.Structure) -> None:
    size = ct.c_uint32(ct.sizeof(info))
    _check(_LIB.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "object info")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _info(fd, info)
    return MapInfo(id=info.id, name=info.name.decode(), key_size=info.key_size,
                   value_size=info.value_size, max_entries=info.max_entries, map_flags=info.map_flags)


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    _info(fd, info)
    return LinkInfo(id=info.id, type=info.type, prog_id=info.prog_id,
                    cgroup_id=info.cgroup_id, attach_type=info.attach_type)


def prog_name(prog_id: int) -> str:
    fd = _check(_LIB.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")
    try:
        info = _ProgInfo()
        _info(fd, info)
        return info.name.decode()
    finally:
        os.close(fd)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_LIB.bpf_link_create(prog_fd, target_fd, attach_type, None), "link create")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swaps the program behind a link in one step: no moment with both or neither attached."""
    _check(_LIB.bpf_link_update(link_fd, prog_fd, None), "link update")


def enable_stats() -> int:
    """Turns on per-program run time and count accounting while the returned fd is open: no
    global sysctl to restore, and it ends with the process even if the process is killed."""
    return _check(_LIB.bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time stats")


def link_detach(link_fd: int) -> None:
    _check(_LIB.bpf_link_detach(link_fd), "link detach")


# --- ring buffers -------------------------------------------------------------------------------

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size): non-zero stops the poll.
_SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_LIB.ring_buffer__new.argtypes = [ct.c_int, _SAMPLE_FN, ct.c_void_p, ct.c_void_p]
_LIB.ring_buffer__new.restype = ct.c_void_p
_LIB.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
_LIB.ring_buffer__consume.argtypes = [ct.c_void_p]
_LIB.ring_buffer__free.argtypes = [ct.c_void_p]


class RingBuffer:
    """The consumer side of a BPF ring buffer map: each record is handed to `on_record` as
    bytes. A ring buffer has one consumer position, so one reader at a time."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        def sample(_ctx: int | None, data: int, size: int) -> int:
            on_record(ct.string_at(data, size))
            return 0

        self._sample = _SAMPLE_FN(sample)  # kept: libbpf calls it for as long as the buffer lives
        ct.set_errno(0)
        self._rb = _LIB.ring_buffer__new(map_fd, self._sample, None, None)
        if not self._rb:
            code = ct.get_errno() or errno.EINVAL
            raise BpfError(code, f"open ring buffer: {os.strerror(code)}")

    def poll(self, timeout_ms: int) -> int:
        """Waits up to `timeout_ms` for records and hands over all there are; returns how many.
        A signal ends the wait early (EINTR counts as none)."""
        ret = _LIB.ring_buffer__poll(self._rb, timeout_ms)
        if ret == -errno.EINTR:
            return 0
        return _check(ret, "poll ring buffer")

    def consume(self) -> int:
        """Hands over the records there are, without waiting."""
        return _check(_LIB.ring_buffer__consume(self._rb), "consume ring buffer")

    def close(self) -> None:
        if self._rb:
            _LIB.ring_buffer__free(self._rb)
            self._rb = None
