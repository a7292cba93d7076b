"""Compiles, loads and attaches the programs; detaches and unpins them on uninstall.

Attachments are BPF links pinned in the bpffs folder, so they outlive the agent (a restarting
agent drops nothing), and a new agent swaps its programs in with one `link_update` per hook:
no moment with no program attached and none with two.

Most hooks are attached to the cgroup ctlb serves for as long as ctlb is installed. An on-demand
hook (the egress program of the drop action, which runs on every packet) is attached only while
something needs it: `OnDemand` switches it. The mesh's programs hang on each meshed pod's own
cgroup instead (`PodLinks`): pods outside the mesh never run them.
"""

from __future__ import annotations

import errno
import os
import pathlib
import dataclasses
from dataclasses import dataclass

import structlog

from ctlb import errors
from ctlb.datapath import cgroup, kernelconf, libbpf, maps

log = structlog.get_logger()

# enum bpf_attach_type (uapi/linux/bpf.h)
CGROUP_INET_EGRESS = 1
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_SOCK_OPS = 3
CGROUP_GETSOCKOPT = 21

# enum bpf_prog_type (uapi/linux/bpf.h); bcc 0.26's Python lacks some (CGROUP_SOCKOPT).
PROG_CGROUP_SKB = 8
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25

# The program files, one per hook family, compiled as one source: bcc compiles one source per
# BPF object, at ~0.4 s of fixed cost each, and makes programs only of the functions of its main
# file (an #include'd file's entry points would not load).
PROGRAM_FILES = ("sock.c", "drop.c")


@dataclass(frozen=True, slots=True)
class Hook:
    program: str  # entry point in bpf/ (sock.c, drop.c)
    attach_type: int
    prog_type: int = PROG_CGROUP_SOCK_ADDR
    on_demand: bool = False  # attached only while needed (`OnDemand`), not by `attach`

    @property
    def name(self) -> str:
        return self.program.removeprefix("ctlb_")

    @property
    def link_pin(self) -> str:
        return "link_" + self.name


# cgroup_skb egress: discards what the socket programs sent to the drop address (bpf/drop.c).
# It costs every packet the node's sockets send, so it is attached only while a frontend may drop.
EGRESS = Hook("ctlb_egress", CGROUP_INET_EGRESS, PROG_CGROUP_SKB, on_demand=True)

HOOKS: tuple[Hook, ...] = (
    Hook("ctlb_connect4", CGROUP_INET4_CONNECT),
    Hook("ctlb_sendmsg4", CGROUP_UDP4_SENDMSG),
    Hook("ctlb_recvmsg4", CGROUP_UDP4_RECVMSG),
    Hook("ctlb_getpeer4", CGROUP_INET4_GETPEERNAME),
    Hook("ctlb_connect6", CGROUP_INET6_CONNECT),
    Hook("ctlb_sendmsg6", CGROUP_UDP6_SENDMSG),
    Hook("ctlb_recvmsg6", CGROUP_UDP6_RECVMSG),
    Hook("ctlb_getpeer6", CGROUP_INET6_GETPEERNAME),
    EGRESS,
)


# Attached to each meshed pod's own cgroup (`PodLinks`), not to the root: the sidecar mesh. The
# redirect runs before the root's connect program (a cgroup's programs run before its
# ancestors'), so a captured connect reaches it sent to the sidecar already; sock_ops records
# redirected connections and getsockopt answers the sidecar's SO_ORIGINAL_DST (the sidecar runs
# in the pod). Pods outside the mesh never run any of them: sock_ops alone would cost ~57 ns on
# each of the ~5 events of every TCP connection.
POD_HOOKS: tuple[Hook, ...] = (
    Hook("ctlb_meshconn4", CGROUP_INET4_CONNECT),
    Hook("ctlb_meshconn6", CGROUP_INET6_CONNECT),
    Hook("ctlb_sockops", CGROUP_SOCK_OPS, PROG_SOCK_OPS),
    Hook("ctlb_getsockopt", CGROUP_GETSOCKOPT, PROG_CGROUP_SOCKOPT),
)
POD_LINK_PREFIX = "link_pod_"  # + "<pod cgroup id>_<hook name>"
MESH_WAYS = 4  # CTLB_MESH_WAYS: slots of an original-destination table one connection may sit in
AFFINITY_WAYS = 4  # CTLB_AFFINITY_WAYS: slots of a session-affinity table one client's entry may sit in

# Link pins of node-wide hooks earlier versions attached: sock_ops and getsockopt, which now hang
# on the meshed pods. Detached once this version's programs are attached, and by uninstall.
LEGACY_LINKS: tuple[str, ...] = ("link_sockops", "link_getsockopt")


def expected_hooks(*, egress: bool) -> tuple[Hook, ...]:
    """The hooks that must be attached: every one but the on-demand egress hook, and that one
    too when `egress` (some frontend may drop)."""
    return tuple(h for h in HOOKS if not h.on_demand or (h is EGRESS and egress))


@dataclass(frozen=True, slots=True)
class MapSizes:
    frontends: int = 65536  # per family; the frontend tables have twice as many slots
    backends: int = 524288  # backend slots per family
    revnat: int = 262144  # per-socket reverse-NAT slots per family (rounded up to a power of two)
    affinity: int = 131072  # per family: session-affinity slots (rounded up to a power of two)
    pods: int = 4096  # pods of this node
    mesh_rules: int = 65536  # per map: mesh exclusion ranges and ports, all pods together
    mesh_conns: int = 65536  # per family: original destinations of redirected connections (slots)
    source_ranges: int = 65536  # per family: loadBalancerSourceRanges entries, all service ports together

    @property
    def frontend_slots(self) -> int:
        return 2 * self.frontends

    @property
    def sock_slots(self) -> int:
        return 1 << max(self.revnat - 1, 1).bit_length()

    @property
    def mesh_conn_slots(self) -> int:
        """Slots of each original-destination table: a power of two, whole sets of ways."""
        return 1 << max(self.mesh_conns - 1, MESH_WAYS - 1).bit_length()

    @property
    def affinity_slots(self) -> int:
        """Slots of each session-affinity table: a power of two, whole sets of ways."""
        return 1 << max(self.affinity - 1, AFFINITY_WAYS - 1).bit_length()

    @property
    def revnat_spill(self) -> int:
        """Entries of the LRU that takes the peers a socket's slot has no room for: rare."""
        return max(self.revnat // 8, 1024)

    def map_entries(self, name: str) -> int:
        """max_entries these sizes give the map `name`."""
        if name in maps.FRONTENDS.values():
            return self.frontend_slots
        if name in maps.BACKENDS.values() or name in maps.MEMBERS.values():
            return self.backends
        if name in maps.SOCKETS.values():
            return self.sock_slots
        if name in maps.REVNAT.values():
            return self.revnat_spill
        if name in maps.AFFINITY.values():
            return self.affinity_slots
        if name in (maps.SETTINGS, maps.TRACE_CTL):
            return 1
        if name == maps.PODS:
            return self.pods
        if name in maps.MESH_CONNS.values():
            return self.mesh_conn_slots
        if name in maps.SOURCE_RANGES.values():
            return self.source_ranges
        return self.mesh_rules


@dataclass(frozen=True, slots=True)
class Attachment:
    hook: str
    program: str
    prog_id: int
    cgroup_id: int


def ensure_bpffs_dir(bpffs: pathlib.Path) -> None:
    """Creates the pin folder; it must sit on a bpf file system or pins cannot be made."""
    bpffs.mkdir(parents=True, exist_ok=True)
    if not _on_bpffs(bpffs):
        raise errors.DatapathError(
            f"{bpffs} is not on a bpf file system: mount one (mount -t bpf bpf /sys/fs/bpf)")


def _on_bpffs(path: pathlib.Path) -> bool:
    """Whether the longest mount point above `path` is a bpf file system (os.statvfs has no
    f_type, so the mount table tells)."""
    resolved = path.resolve()
    best = ""
    fstype = ""
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mnt = fields[1]
        if (str(resolved) == mnt or str(resolved).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return fstype == "bpf"


def sizes_of_pins(bpffs: pathlib.Path, sizes: MapSizes) -> MapSizes:
    """`sizes`, with the table sizes the programs compute with taken from the pinned maps if
    they exist: the programs compute home slots from the frontend table size, and socket slots,
    affinity sets and original-destination sets from those tables' sizes, which must be those
    of the maps they open."""
    found: dict[str, int] = {}
    for name in (maps.FRONTENDS[4], maps.SOCKETS[4], maps.AFFINITY[4], maps.MESH_CONNS[4]):
        try:
            fd = libbpf.obj_get(str(bpffs / name))
        except libbpf.BpfError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        try:
            found[name] = libbpf.map_info(fd).max_entries
        finally:
            os.close(fd)
    frontends = found[maps.FRONTENDS[4]] // 2 if maps.FRONTENDS[4] in found else sizes.frontends
    return dataclasses.replace(sizes, frontends=frontends, revnat=found.get(maps.SOCKETS[4], sizes.revnat),
                               affinity=found.get(maps.AFFINITY[4], sizes.affinity),
                               mesh_conns=found.get(maps.MESH_CONNS[4], sizes.mesh_conns))


def compile_and_load(bpffs: pathlib.Path, sizes: MapSizes) -> tuple[object, dict[str, int]]:
    """Compiles the program files, opening (or creating and pinning) their maps in `bpffs`.

    Returns the bcc BPF object (keep it alive while the programs are being attached) and the
    program fds by entry-point name.
    """
    from bcc import BPF  # Debian's python3-bpfcc

    src = maps.bpf_source_dir()
    cflags = [
        f"-I{src}",
        f'-DCTLB_PIN_DIR="{bpffs}"',
        f"-DCTLB_FRONTENDS_MAX={sizes.frontends}",
        f"-DCTLB_BACKENDS_MAX={sizes.backends}",
        f"-DCTLB_SOCK_SLOTS={sizes.sock_slots}",
        f"-DCTLB_REVNAT_MAX={sizes.revnat_spill}",
        f"-DCTLB_AFFINITY_SLOTS={sizes.affinity_slots}",
        f"-DCTLB_PODS_MAX={sizes.pods}",
        f"-DCTLB_MESH_RULES_MAX={sizes.mesh_rules}",
        f"-DCTLB_MESH_CONN_SLOTS={sizes.mesh_conn_slots}",
        f"-DCTLB_SOURCE_RANGES_MAX={sizes.source_ranges}",
        "-w",
    ]
    hz = kernelconf.kernel_hz()
    if hz is not None:
        cflags.append(f"-DCTLB_HZ={hz}")
    try:
        bpf = BPF(text=program_text(src), cflags=cflags)
        fds = {h.program: bpf.load_func(h.program.encode(), h.prog_type,
                                        attach_type=h.attach_type).fd for h in (*HOOKS, *POD_HOOKS)}
    except Exception as exc:  # bcc raises bare Exception for compile and verifier failures
        raise errors.DatapathError(f"loading bpf/{{{','.join(PROGRAM_FILES)}}} failed: {exc}") from exc
    return bpf, fds


def program_text(src: pathlib.Path) -> bytes:
    """The program files joined into one source, each behind a line marker so the compiler's
    messages name the file and line they come from."""
    return b"".join(b'#line 1 "%s"\n' % str(src / name).encode() + (src / name).read_bytes() + b"\n"
                    for name in PROGRAM_FILES)


def attach(cgroup_path: pathlib.Path, bpffs: pathlib.Path, prog_fds: dict[str, int]) -> None:
    """Attaches every hook to `cgroup_path`, replacing the programs of pinned links in place.
    An on-demand hook is only swapped to this version's program if it is attached already, and
    so are the pods' links."""
    for hook in HOOKS:
        if not hook.on_demand or (bpffs / hook.link_pin).exists():
            attach_hook(hook, cgroup_path, bpffs, prog_fds[hook.program])
    PodLinks(bpffs, prog_fds).swap_programs()
    for name in LEGACY_LINKS:
        if _detach_pin(bpffs / name):
            log.info("legacy_link_detached", pin=name)


def attach_hook(hook: Hook, cgroup_path: pathlib.Path, bpffs: pathlib.Path, prog_fd: int) -> None:
    """Attaches one hook to `cgroup_path` through a pinned link, or swaps its program in."""
    target = cgroup.cgroup_id(cgroup_path)
    cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _attach_one(hook, cg_fd, target, bpffs / hook.link_pin, prog_fd)
    finally:
        os.close(cg_fd)


def detach_hook(hook: Hook, bpffs: pathlib.Path) -> bool:
    """Detaches one hook and removes its link pin; False if it was not attached."""
    return _detach_pin(bpffs / hook.link_pin)


class OnDemand:
    """Switches an on-demand hook: attached before its first user, detached after its last.

    Whether it is attached is read from its link pin, so a restarted agent picks up where the
    last one left it.
    """

    def __init__(self, hook: Hook, *, cgroup_path: pathlib.Path, bpffs: pathlib.Path, prog_fd: int) -> None:
        self.hook = hook
        self._cgroup = cgroup_path
        self._bpffs = bpffs
        self._prog_fd = prog_fd
        self._attached = (bpffs / hook.link_pin).exists()

    @property
    def attached(self) -> bool:
        return self._attached

    def ensure(self) -> None:
        if not self._attached:
            attach_hook(self.hook, self._cgroup, self._bpffs, self._prog_fd)
            self._attached = True
            log.info("program_attached_on_demand", hook=self.hook.program)

    def release(self) -> None:
        if self._attached:
            detach_hook(self.hook, self._bpffs)
            self._attached = False
            log.info("program_detached_on_demand", hook=self.hook.program)


class PodLinks:
    """The pod hooks (`POD_HOOKS`) of each meshed pod, as links pinned beside the maps and named
    by the pod cgroup's id, so a restarted agent finds them and a pod that left is detached."""

    def __init__(self, bpffs: pathlib.Path, prog_fds: dict[str, int]) -> None:
        self._bpffs = bpffs
        self._prog_fds = {h.program: prog_fds[h.program] for h in POD_HOOKS}

    def pods(self) -> set[int]:
        """The pod cgroup ids that have a pinned pod link."""
        return {int(name.split("_")[0]) for name in self._pin_names()}

    def sync(self, wanted: dict[int, pathlib.Path]) -> dict[int, str]:
        """Attaches the pod hooks to the cgroups of `wanted` (pod cgroup id → path) that lack
        them, and detaches them from every other pod. Returns why a pod could not be attached,
        by cgroup id; the others are attached all the same."""
        failed: dict[int, str] = {}
        for cgroup_id, path in wanted.items():
            try:
                self._attach_pod(cgroup_id, path)
            except (OSError, libbpf.BpfError) as exc:
                failed[cgroup_id] = str(exc)
                self._detach_pod(cgroup_id)  # all of its hooks or none
        for cgroup_id in self.pods() - wanted.keys():
            self._detach_pod(cgroup_id)
        return failed

    def swap_programs(self) -> None:
        """Points every pod link at this version's program (after an agent upgrade)."""
        for name in self._pin_names():
            hook = next((h for h in POD_HOOKS if name.endswith("_" + h.name)), None)
            fd = _open_link(self._bpffs / (POD_LINK_PREFIX + name))
            if fd is None:
                continue
            try:
                if hook is not None:
                    libbpf.link_update(fd, self._prog_fds[hook.program])
            finally:
                os.close(fd)

    def _attach_pod(self, cgroup_id: int, path: pathlib.Path) -> None:
        missing = [h for h in POD_HOOKS if not self._pin(cgroup_id, h).exists()]
        if not missing:
            return
        cg_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in missing:
                _attach_one(hook, cg_fd, cgroup_id, self._pin(cgroup_id, hook), self._prog_fds[hook.program])
        finally:
            os.close(cg_fd)
        log.debug("pod_programs_attached", cgroup_id=cgroup_id)

    def _detach_pod(self, cgroup_id: int) -> None:
        for hook in POD_HOOKS:
            _detach_pin(self._pin(cgroup_id, hook))

    def _pin(self, cgroup_id: int, hook: Hook) -> pathlib.Path:
        return self._bpffs / f"{POD_LINK_PREFIX}{cgroup_id}_{hook.name}"

    def _pin_names(self) -> list[str]:
        """The pod link pins' names without the prefix: "<cgroup id>_<hook name>"."""
        if not self._bpffs.is_dir():
            return []
        return [e.name.removeprefix(POD_LINK_PREFIX) for e in self._bpffs.iterdir()
                if e.name.startswith(POD_LINK_PREFIX)]


def _detach_pin(pin: pathlib.Path) -> bool:
    """Detaches a pinned link and removes its pin; False if there was none. A link whose cgroup
    is gone was detached by the kernel already: only its pin is left to remove."""
    fd = _open_link(pin)
    if fd is None:
        return False
    try:
        libbpf.link_detach(fd)
    except libbpf.BpfError:
        pass  # its cgroup is gone: nothing attached any more
    finally:
        os.close(fd)
    pin.unlink()
    return True


def _attach_one(hook: Hook, cg_fd: int, target: int, pin: pathlib.Path, prog_fd: int) -> None:
    old = _open_link(pin)
    try:
        if old is not None and libbpf.link_info(old).cgroup_id == target:
            libbpf.link_update(old, prog_fd)
            log.debug("program_replaced", hook=hook.program)
            return
        new = libbpf.link_create(prog_fd, cg_fd, hook.attach_type)
        try:
            if old is not None:
                # Moving to another cgroup: the new link is attached before the old one goes.
                pin.unlink()
                libbpf.link_detach(old)
            libbpf.obj_pin(new, str(pin))
        finally:
            os.close(new)
        log.debug("program_attached", hook=hook.program)
    finally:
        if old is not None:
            os.close(old)


def _open_link(pin: pathlib.Path) -> int | None:
    try:
        return libbpf.obj_get(str(pin))
    except libbpf.BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def attachments(bpffs: pathlib.Path) -> list[Attachment]:
    """The programs attached through ctlb's pinned links to the cgroup it serves."""
    found = (_attachment(hook.name, bpffs / hook.link_pin) for hook in HOOKS)
    return [a for a in found if a is not None]


def pod_attachments(bpffs: pathlib.Path) -> list[Attachment]:
    """The mesh's programs attached to meshed pods' cgroups (`PodLinks`). A link whose pod
    cgroup is gone shows cgroup id 0 until the agent removes it."""
    pins = sorted(bpffs.glob(POD_LINK_PREFIX + "*")) if bpffs.is_dir() else []
    found = (_attachment(pin.name.removeprefix(POD_LINK_PREFIX).split("_", 1)[1], pin) for pin in pins)
    return [a for a in found if a is not None]


def _attachment(hook: str, pin: pathlib.Path) -> Attachment | None:
    fd = _open_link(pin)
    if fd is None:
        return None
    try:
        info = libbpf.link_info(fd)
    finally:
        os.close(fd)
    name = libbpf.prog_name(info.prog_id) if info.prog_id else ""
    return Attachment(hook=hook, program=name, prog_id=info.prog_id, cgroup_id=info.cgroup_id)


def remove_legacy_maps(bpffs: pathlib.Path) -> list[str]:
    """Removes the pins of earlier map layouts, once no attached program uses them."""
    removed = []
    for name in maps.LEGACY_MAPS:
        pin = bpffs / name
        if pin.exists():
            pin.unlink()
            removed.append(name)
    if removed:
        log.info("legacy_maps_removed", maps=removed)
    return removed


def uninstall(bpffs: pathlib.Path) -> list[str]:
    """Detaches every program and removes every pin under `bpffs`. Returns what it removed."""
    removed = [hook.link_pin for hook in HOOKS if detach_hook(hook, bpffs)]
    removed += [name for name in LEGACY_LINKS if _detach_pin(bpffs / name)]
    if bpffs.is_dir():
        for entry in sorted(bpffs.iterdir()):
            if entry.name.startswith(POD_LINK_PREFIX) and _detach_pin(entry):
                removed.append(entry.name)
        for entry in sorted(bpffs.iterdir()):
            # Only ctlb's own pins: the folder may be shared with other tools.
            if entry.name in maps.ALL_PINS or entry.name in maps.LEGACY_MAPS:
                entry.unlink()
                removed.append(entry.name)
        if not any(bpffs.iterdir()):
            bpffs.rmdir()
    return removed
