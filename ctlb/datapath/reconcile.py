"""Brings the load-balancing maps to the desired state, writing only the difference.

Make before break: a backend set is written in full, in a free range of the backend table and
under a fresh set id, before any frontend points at it; frontends flip with one table update
each, and the old set is cleared and its range freed only after no frontend refers to it.
Whatever does not fit (a full table) is reported by service port and left as it was, so nothing
already programmed is lost.

The reconciler keeps a shadow of what it programmed; it reads the maps once, at adoption, so a
restarted agent takes over what the last one left without rewriting it.

A pass that starts from empty maps (a fresh node) writes in batches: `_Batch` collects every
backend slot, affinity member and frontend of the pass, and `_flush` writes them in that order, a
few syscalls per map instead of one per entry; see `_Batch` for why that keeps make-before-break.

A frontend that drops (LB_F_DROP), or may drop a client (LB_F_SOURCE_RANGES), needs the egress
program that discards what is sent to the drop address: the reconciler has it attached
(`Egress.ensure`) before it writes the first such frontend, and says when none is left
(`needs_egress`), so the caller can detach it.

A service port's source ranges are written before its frontends are flagged to use them, and
deleted after no frontend does: during a change a client is judged by the old or the new ranges,
or by both (their union), never by none.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import struct
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from ctlb import desired, errors, model
from ctlb.datapath import tables

log = structlog.get_logger()

_ID_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Programmed:
    """What the maps hold, as values: frontends, complete backend sets, affinity members."""

    frontends: dict[desired.Frontend, tables.FrontendValue] = field(default_factory=dict)
    sets: dict[tuple[int, int], tuple[desired.Backend, ...]] = field(default_factory=dict)  # (family, set id)
    starts: dict[tuple[int, int], int] = field(default_factory=dict)  # (family, set id) -> first slot
    slots: Counter[int] = field(default_factory=Counter)  # used backend slots per family, incl. stray ones
    members: set[tables.MemberKey] = field(default_factory=set)
    # (family, svc id) -> the service port's loadBalancerSourceRanges in the LPM maps
    source_ranges: dict[tuple[int, int], set[desired.SourceRange]] = field(default_factory=dict)

    def frontend_count(self, fam: int) -> int:
        return sum(1 for fe in self.frontends if fe.address.version == fam)

    def member_count(self, fam: int) -> int:
        return sum(1 for m in self.members if m.backend.address.version == fam)

    def source_range_count(self, fam: int) -> int:
        return sum(len(ranges) for (f, _), ranges in self.source_ranges.items() if f == fam)


@dataclass(frozen=True, slots=True)
class Outcome:
    problems: tuple[model.Problem, ...]
    writes: int
    deletes: int


def read_programmed(family_tables: Mapping[int, tables.FamilyTables]) -> Programmed:
    """Reads what the maps hold. A set is what a frontend points at, when every slot of its range
    carries its id; slots no such set covers (a writer died half way) are left out of the view,
    so the next reconcile clears them."""
    prog = Programmed()
    for fam, t in family_tables.items():
        frontends = dict(t.frontends.items())
        prog.frontends.update(frontends)
        slots = dict(t.backends.items())
        prog.slots[fam] = len(slots)
        for value in frontends.values():
            if not value.count or (fam, value.set_id) in prog.sets:
                continue
            found = [slots.get(value.start + i) for i in range(value.count)]
            if all(s is not None and s.set_id == value.set_id for s in found):
                prog.sets[(fam, value.set_id)] = tuple(s.backend for s in found)  # type: ignore[union-attr]
                prog.starts[(fam, value.set_id)] = value.start
        prog.members.update(key for key, _ in t.members.items())
        for key, _ in t.source_ranges.items():
            prog.source_ranges.setdefault((fam, key.svc_id), set()).add(key.network)
    return prog


class Ranges:
    """The free ranges of a backend table: best fit, so sets of one size reuse each other's
    ranges, and a freed range merges with its free neighbours."""

    def __init__(self, capacity: int, used: Iterable[tuple[int, int]] = ()) -> None:
        self.capacity = capacity
        self._starts: list[int] = []  # sorted starts of the free ranges
        self._length: dict[int, int] = {}
        at = 0
        for start, n in sorted(used):
            if start > at:
                self._add(at, start - at)
            at = max(at, start + n)
        if at < capacity:
            self._add(at, capacity - at)

    def free_slots(self) -> int:
        return sum(self._length.values())

    def allocate(self, n: int) -> int | None:
        """The start of a free range of n slots, now taken; None if no free range is that long."""
        best = None
        for start in self._starts:
            length = self._length[start]
            if length >= n and (best is None or length < self._length[best]):
                best = start
                if length == n:
                    break
        if best is None:
            return None
        length = self._remove(best)
        if length > n:
            self._add(best + n, length - n)
        return best

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start + n:  # merge with the next
            n += self._remove(start + n)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._length[prev] == start:  # merge with the previous
                start, n = prev, self._remove(prev) + n
        self._add(start, n)

    def _add(self, start: int, n: int) -> None:
        bisect.insort(self._starts, start)
        self._length[start] = n

    def _remove(self, start: int) -> int:
        self._starts.pop(bisect.bisect_left(self._starts, start))
        return self._length.pop(start)


def _view_entry(backends: Iterable[object], affinity: int | None, drop: bool,
                sources: Iterable[desired.SourceRange] | None = None, admit_node: bool = False) -> dict[str, object]:
    """One frontend's view entry. `drop` and the source ranges are only present when set, so the
    entries (and digests) of every other frontend read as they did before those existed."""
    entry: dict[str, object] = {"backends": sorted(str(b) for b in backends), "affinity": affinity}
    if drop:
        entry["drop"] = True
    if sources is not None:
        entry["sources"] = sorted({str(n) for n in sources})
        entry["sources_admit_node"] = admit_node
    return entry


def datapath_view(frontends: Mapping[desired.Frontend, tables.FrontendValue],
                  sets: Mapping[tuple[int, int], tuple[desired.Backend, ...]],
                  source_ranges: Mapping[tuple[int, int], Collection[desired.SourceRange]]) -> dict[str, object]:
    """What a client observes, id-free: frontend -> backends, affinity, drop, and which clients
    it admits. Two datapaths with the same view balance alike; `ctlb status` tells whether the
    maps are in sync by a digest of the same content (`programmed_digest`), not of this text."""
    view: dict[str, object] = {}
    for fe, value in sorted(frontends.items()):
        fam = fe.address.version
        backends = sets.get((fam, value.set_id), ()) if value.count else ()
        if len(backends) != value.count:
            backends = ("<incomplete>",)  # type: ignore[assignment]
        restricted = bool(value.flags & tables.LB_F_SOURCE_RANGES)
        view[str(fe)] = _view_entry(
            backends, value.affinity_timeout if value.flags & tables.LB_F_AFFINITY else None,
            drop=not value.count and bool(value.flags & tables.LB_F_DROP),
            sources=source_ranges.get((fam, value.svc_id), ()) if restricted else None,
            admit_node=bool(value.flags & tables.LB_F_SOURCE_NODE))
    return view


def desired_view(state: desired.DesiredState) -> dict[str, object]:
    view: dict[str, object] = {}
    for sp in state.service_ports.values():
        view.update(service_port_view(sp))
    return dict(sorted(view.items()))


def _group_entry(sp: desired.ServicePortState, group: desired.FrontendGroup) -> dict[str, object]:
    """The view entry every frontend of `group` has."""
    return _view_entry(group.backends, sp.affinity_timeout, drop=group.drop,
                       sources=sp.source_ranges if group.restricted else None,
                       admit_node=group.restricted and sp.source_ranges_admit_node)


def service_port_view(sp: desired.ServicePortState) -> dict[str, object]:
    """The view entries of one service port's frontends."""
    view: dict[str, object] = {}
    for group in sp.frontend_groups():
        value = _group_entry(sp, group)
        view.update((str(fe), value) for fe in group.frontends)
    return view


# --- the state digest ----------------------------------------------------------------------------
#
# `ctlb status` tells whether the maps are in sync by comparing a digest of what they hold
# (`programmed_digest`) with the one the agent keeps of what it wants (`service_port_digest`,
# summed over service ports). Both hash the same bytes per frontend: the frontend, then its
# group's value (what the view entry says: backends, affinity, drop, admitted clients). Bytes,
# not the view's text: turning 40k backend addresses into text took most of the digest's 0.15 s
# at 10k Services. The digest is a sum over frontends, so it does not depend on order and the
# agent keeps it current service port by service port.

# IANA protocol numbers: one byte per frontend instead of the name.
_PROTOCOL_NUMBER = {model.Protocol.TCP: 6, model.Protocol.UDP: 17, model.Protocol.SCTP: 132}
_FRONTEND_HEAD = struct.Struct(">BHB").pack  # family, port, protocol; then the address
# affinity (-1 for none), _G_* flags, backend count; then the backends, each address and port
_GROUP_HEAD = struct.Struct(">qBI").pack
_SOURCES_HEAD = struct.Struct(">I").pack  # range count; then each range's address and prefix length
_G_DROP = 1 << 0
_G_RESTRICTED = 1 << 1
_G_ADMIT_NODE = 1 << 2
_G_INCOMPLETE = 1 << 3  # the maps only: a set some slot of which is missing


def _frontend_bytes(fe: desired.Frontend) -> bytes:
    return _FRONTEND_HEAD(fe.address.version, fe.port, _PROTOCOL_NUMBER[fe.protocol]) + fe.address.packed


def _group_bytes(backends: Iterable[desired.Backend], *, affinity: int | None, drop: bool,
                 sources: Iterable[desired.SourceRange] | None, admit_node: bool,
                 incomplete: bool = False) -> bytes:
    """The value every frontend of a group shares. A set's backends are all of its frontends'
    family (there is one backend table per family), so each has a fixed length and the count
    says where they end; sorted, since the maps keep them in slot order."""
    encoded = sorted([b.address.packed + b.port.to_bytes(2, "big") for b in backends])
    flags = ((_G_DROP if drop else 0) | (_G_INCOMPLETE if incomplete else 0)
             | (_G_RESTRICTED | (_G_ADMIT_NODE if admit_node else 0) if sources is not None else 0))
    out = _GROUP_HEAD(-1 if affinity is None else affinity, flags, len(encoded)) + b"".join(encoded)
    if sources is not None:
        networks = sorted({n.network_address.packed + bytes((n.prefixlen,)) for n in sources})
        out += _SOURCES_HEAD(len(networks)) + b"".join(networks)
    return out


def _entry_digest(frontend: bytes, group: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(frontend + group, digest_size=8).digest(), "big")


def service_port_digest(sp: desired.ServicePortState) -> int:
    """One service port's share of the desired state's digest: what `programmed_digest` finds
    for its frontends once they are programmed."""
    total = 0
    for group in sp.frontend_groups():
        value = _group_bytes(group.backends, affinity=sp.affinity_timeout, drop=group.drop,
                             sources=sp.source_ranges if group.restricted else None,
                             admit_node=group.restricted and sp.source_ranges_admit_node)
        for fe in group.frontends:
            total += _entry_digest(_frontend_bytes(fe), value)
    return total


def programmed_digest(prog: Programmed) -> str:
    """The digest of what the maps hold, read as `datapath_view` reads them; equal to the
    desired state's (`combine` of the sum of `service_port_digest`) when the maps are in sync."""
    total = 0
    groups: dict[tuple[int, int, int, int, int, int], bytes] = {}
    for fe, value in prog.frontends.items():
        fam = fe.address.version
        key = (fam, value.set_id, value.count, value.flags, value.affinity_timeout, value.svc_id)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _programmed_group(prog, fam, value)
        total += _entry_digest(_frontend_bytes(fe), group)
    return combine(total)


def _programmed_group(prog: Programmed, fam: int, value: tables.FrontendValue) -> bytes:
    """`_group_bytes` of a programmed frontend, with the meaning `datapath_view` gives its flags."""
    backends = prog.sets.get((fam, value.set_id), ()) if value.count else ()
    incomplete = len(backends) != value.count
    restricted = bool(value.flags & tables.LB_F_SOURCE_RANGES)
    return _group_bytes(
        () if incomplete else backends,
        affinity=value.affinity_timeout if value.flags & tables.LB_F_AFFINITY else None,
        drop=not value.count and bool(value.flags & tables.LB_F_DROP),
        sources=prog.source_ranges.get((fam, value.svc_id), ()) if restricted else None,
        admit_node=restricted and bool(value.flags & tables.LB_F_SOURCE_NODE),
        incomplete=incomplete)


def combine(total: int) -> str:
    return f"{total % (1 << 64):016x}"


class Egress(Protocol):
    """The egress program of the drop action, attached on demand (`programs.OnDemand`)."""

    def ensure(self) -> None:
        """Attaches it if it is not attached."""
        ...


def _needs_egress(value: tables.FrontendValue) -> bool:
    return bool(value.flags & tables.NEEDS_EGRESS)


class Reconciler:
    """Owns the frontend, backend and member maps of both families."""

    def __init__(self, family_tables: Mapping[int, tables.FamilyTables], *, egress: Egress | None = None,
                 batch_from_empty: bool = True) -> None:
        self._tables = family_tables
        self._egress = egress
        self.programmed = read_programmed(family_tables)
        # Frontends whose flags need the egress program: it must be attached while this is > 0.
        self._egress_users = sum(1 for v in self.programmed.frontends.values() if _needs_egress(v))
        self.svc_ids: dict[desired.ServicePortName, int] = {}
        self.service_of: dict[int, desired.ServicePortName] = {}
        used_sets = [set_id for (_, set_id) in self.programmed.sets] + [
            v.set_id for v in self.programmed.frontends.values()]
        self._next_set = max(used_sets, default=0) + 1
        self._next_svc = max((v.svc_id for v in self.programmed.frontends.values()), default=0) + 1
        self.failed: set[desired.ServicePortName] = set()
        # What the last passes programmed, by service port: a pass only touches the service ports
        # whose desired state is not this very value (semantics hands on unchanged ones as is).
        self._applied: dict[desired.ServicePortName, desired.ServicePortState] = {}
        self._first_pass = True
        # Frontends pointing at each (family, set id); sets whose count fell are checked for
        # deletion at the end of a pass, so no pass walks every set.
        self._set_refs: Counter[tuple[int, int]] = Counter(
            (fe.address.version, v.set_id) for fe, v in self.programmed.frontends.items())
        self._unref_candidates: set[tuple[int, int]] = set(self.programmed.sets)
        self._ranges = {fam: Ranges(t.backends.max_entries,
                                    [(self.programmed.starts[(f, set_id)], len(backends))
                                     for (f, set_id), backends in self.programmed.sets.items() if f == fam])
                        for fam, t in family_tables.items()}
        # Entries per family in the maps only user space writes, for capacity checks in O(1).
        self._fe_count = Counter({fam: self.programmed.frontend_count(fam) for fam in family_tables})
        self._member_count = Counter({fam: self.programmed.member_count(fam) for fam in family_tables})
        self._range_count = Counter({fam: self.programmed.source_range_count(fam) for fam in family_tables})
        self._writes = 0
        self._deletes = 0
        # Set while a pass from empty maps collects its writes (see `_Batch`); `_owner` is the
        # service port being programmed, whom the collected writes belong to.
        self._batch_from_empty = batch_from_empty
        self._batch: _Batch | None = None
        self._owner: desired.ServicePortName | None = None

    # --- the whole pass ---------------------------------------------------------------------

    def apply(self, state: desired.DesiredState, *, hint: Collection[desired.ServicePortName] | None = None) -> Outcome:
        """Programs `state`; returns the service ports that could not be programmed, and why.

        The first pass compares everything with the maps (adoption); later passes only the
        service ports that changed since the pass before: those named in `hint` (with the ones
        that failed last time) when the caller knows, else found by walking `state`.
        """
        self._writes = self._deletes = 0
        if self._first_pass and self._egress_users:
            self._ensure_egress()  # adopted frontends drop: make sure what they rely on is there
        if self._first_pass:
            changed = dict(state.service_ports)
            removed: dict[desired.ServicePortName, desired.ServicePortState] = {}
        else:
            candidates = state.service_ports.keys() | self._applied.keys() if hint is None else {*hint, *self.failed}
            changed = {n: sp for n in candidates if (sp := state.service_ports.get(n)) is not None
                       and self._applied.get(n) is not sp}
            removed = {n: self._applied[n] for n in candidates if n in self._applied and n not in state.service_ports}
        previous = {n: self._applied[n] for n in changed if n in self._applied} | removed
        removed_ids = {n: self.svc_ids[n] for n in removed}
        self._assign_svc_ids(changed)
        if self._first_pass:
            self._delete_unwanted_frontends(state)
        else:
            self._delete_dropped_frontends(changed, previous)
        problems: list[model.Problem] = []
        self.failed = set()
        if self._first_pass and self._batch_from_empty and not self.programmed.frontends:
            self._batch = _Batch()
        for name in sorted(changed):
            self._owner = name
            problem = self._program_service_port(changed[name])
            if problem is None:
                self._applied[name] = changed[name]
            else:
                problems.append(problem)
                self.failed.add(name)
                self._applied.pop(name, None)
        self._owner = None
        if self._batch is not None:
            self._flush(problems)
        for name in removed:
            del self._applied[name]
        if self._first_pass:
            self._delete_stale_members(state)
            self._delete_unowned_source_ranges()
        else:
            self._delete_stale_members_of(previous, changed=changed, ids={**self.svc_ids, **removed_ids})
        for name in removed:
            self._delete_source_ranges(removed_ids[name], keep=())
        self._release_svc_ids(removed)
        self._collect_unreferenced_sets()
        self._first_pass = False
        return Outcome(problems=tuple(problems), writes=self._writes, deletes=self._deletes)

    def view(self) -> dict[str, object]:
        return datapath_view(self.programmed.frontends, self.programmed.sets, self.programmed.source_ranges)

    def needs_egress(self) -> bool:
        """Whether some programmed frontend relies on the egress program."""
        return self._egress_users > 0

    def _ensure_egress(self) -> None:
        if self._egress is not None:
            self._egress.ensure()

    # --- ids ----------------------------------------------------------------------------------

    def _assign_svc_ids(self, service_ports: Mapping[desired.ServicePortName, desired.ServicePortState]) -> None:
        """Keeps a service port's id for as long as it exists, across restarts too (adopted from
        the frontends it had), so affinity entries stay valid."""
        new = sorted(name for name in service_ports if name not in self.svc_ids)
        if not new:
            return
        in_maps = {v.svc_id for v in self.programmed.frontends.values()}
        for name in new:
            adopted = self._adoptable_id(service_ports[name]) if in_maps else None  # nothing to adopt from empty maps
            svc_id = adopted or self._allocate_svc_id(in_maps)
            self.svc_ids[name] = svc_id
            self.service_of[svc_id] = name

    def _release_svc_ids(self, names: Iterable[desired.ServicePortName]) -> None:
        for name in names:
            del self.service_of[self.svc_ids.pop(name)]

    def _adoptable_id(self, sp: desired.ServicePortState) -> int | None:
        ids = Counter(self.programmed.frontends[fe].svc_id for fe in sp.frontends
                      if fe in self.programmed.frontends)
        for svc_id, _ in ids.most_common():
            if svc_id not in self.service_of:
                return svc_id
        return None

    def _allocate_svc_id(self, in_maps: set[int]) -> int:
        while self._next_svc in self.service_of or self._next_svc in in_maps or self._next_svc == 0:
            self._next_svc = self._next_svc % _ID_MAX + 1
        svc_id = self._next_svc
        self._next_svc = self._next_svc % _ID_MAX + 1
        return svc_id

    def _allocate_set_id(self) -> int:
        sets = self.programmed.sets
        while (4, self._next_set) in sets or (6, self._next_set) in sets or self._next_set == 0:
            self._next_set = self._next_set % _ID_MAX + 1
        set_id = self._next_set
        self._next_set = self._next_set % _ID_MAX + 1
        return set_id

    # --- frontends ----------------------------------------------------------------------------

    def _delete_unwanted_frontends(self, state: desired.DesiredState) -> None:
        """Adoption: every frontend in the maps that the desired state does not have."""
        if not self.programmed.frontends:
            return  # empty maps: a start from scratch
        wanted = {fe for sp in state.service_ports.values() for fe in sp.frontends}
        for fe in [fe for fe in self.programmed.frontends if fe not in wanted]:
            self._delete_frontend(fe)

    def _delete_dropped_frontends(self, changed: Mapping[desired.ServicePortName, desired.ServicePortState],
                                  previous: Mapping[desired.ServicePortName, desired.ServicePortState]) -> None:
        """The frontends changed or removed service ports had and no longer have. A frontend that
        moves to another changed service port is overwritten in place instead, never deleted."""
        claimed = {fe for sp in changed.values() for fe in sp.frontends}
        for old in previous.values():
            for fe in old.frontends:
                if fe not in claimed and fe in self.programmed.frontends:
                    self._delete_frontend(fe)

    def _delete_frontend(self, fe: desired.Frontend) -> None:
        self._tables[fe.address.version].frontends.delete(fe)
        self._forget_frontend(fe)
        self._deletes += 1

    def _forget_frontend(self, fe: desired.Frontend) -> None:
        """Takes a frontend out of the shadow and of what it counted towards."""
        fam = fe.address.version
        old = self.programmed.frontends.pop(fe)
        self._unreference(fam, old.set_id)
        self._egress_users -= _needs_egress(old)
        self._fe_count[fam] -= 1

    def _unreference(self, fam: int, set_id: int) -> None:
        self._set_refs[(fam, set_id)] -= 1
        self._unref_candidates.add((fam, set_id))

    def _program_service_port(self, sp: desired.ServicePortState) -> model.Problem | None:
        fam = 4 if sp.name.family == model.IPFamily.IPv4 else 6
        svc_id = self.svc_ids[sp.name]
        # Groups with equal backends (gated and ungated frontends) share one set. A service port
        # of one group (the common case) has none to share with: not hashing its backends for
        # nothing saves ~8 address hashes per service port.
        groups = sp.frontend_groups()
        made: dict[tuple[desired.Backend, ...], tuple[int, int]] | None = {} if len(groups) > 1 else None
        try:
            self._add_source_ranges(fam, svc_id, sp.source_ranges)
            for group in groups:
                self._program_group(fam, svc_id, sp, group, made)
        except errors.MapFull as exc:
            # Ranges added stay: a frontend flipped before the failure may rely on them. Until a
            # pass succeeds, clients are judged by the old ranges and the new ones together.
            return _not_programmed(sp.name, exc)
        self._delete_source_ranges(svc_id, keep=sp.source_ranges, fam=fam)
        return None

    def _program_group(self, fam: int, svc_id: int, sp: desired.ServicePortState, group: desired.FrontendGroup,
                       made: dict[tuple[desired.Backend, ...], tuple[int, int]] | None) -> None:
        """Points the group's frontends (of one service port) at a set holding its backends;
        `made` holds the sets the service port's other groups got, None when it has no others."""
        if made is None:
            set_id, start = self._ensure_set(fam, group.backends, group.frontends)
        else:
            set_id, start = made.get(group.backends) or self._ensure_set(fam, group.backends, group.frontends)
            made[group.backends] = (set_id, start)
        if sp.affinity_timeout is not None:
            self._ensure_members(fam, svc_id, group.backends)
        flags = tables.LB_F_AFFINITY if sp.affinity_timeout is not None else 0
        if group.drop:
            flags |= tables.LB_F_DROP
        if group.restricted:
            flags |= tables.LB_F_SOURCE_RANGES
            if sp.source_ranges_admit_node:
                flags |= tables.LB_F_SOURCE_NODE
        value = tables.FrontendValue(
            svc_id=svc_id, set_id=set_id, count=len(group.backends),
            affinity_timeout=sp.affinity_timeout or 0, flags=flags, start=start,
        )
        self._write_frontends(fam, group.frontends, value)

    def _write_frontends(self, fam: int, frontends: tuple[desired.Frontend, ...], value: tables.FrontendValue) -> None:
        table = self._tables[fam].frontends
        new = [fe for fe in frontends if fe not in self.programmed.frontends]
        # Checked before the first write, so a frontend group is programmed whole or not at all
        # (a group of one is: its one write fails or not, which the table checks itself, unless
        # it drops: the egress program is attached before that write, so it must fit first).
        whole = len(frontends) > 1 or _needs_egress(value)
        if self._fe_count[fam] + len(new) > table.max_entries or (whole and not table.room_for(new)):
            raise errors.MapFull(table.name, table.max_entries)
        for fe in sorted(frontends) if len(frontends) > 1 else frontends:
            old = self.programmed.frontends.get(fe)
            if old == value:
                continue
            if _needs_egress(value):
                self._ensure_egress()  # before a socket can be sent to the drop address
            if self._batch is not None and old is None and self._owner is not None:
                table.put_later(fe, value)  # written by `_flush`, after every set
                self._batch.frontends.setdefault(self._owner, []).append(fe)
            else:
                table.put(fe, value)
            self._egress_users += _needs_egress(value) - (old is not None and _needs_egress(old))
            if old is None:
                self._fe_count[fam] += 1
            else:
                self._unreference(fam, old.set_id)
            self._set_refs[(fam, value.set_id)] += 1
            self.programmed.frontends[fe] = value
            self._writes += 1

    # --- backend sets -------------------------------------------------------------------------

    def _ensure_set(self, fam: int, backends: tuple[desired.Backend, ...],
                    frontends: tuple[desired.Frontend, ...]) -> tuple[int, int]:
        """The id and first slot of a complete set holding exactly `backends`, written into a
        free range if need be."""
        if not backends:
            return 0, 0
        for fe in frontends:
            current = self.programmed.frontends.get(fe)
            if current is not None and self.programmed.sets.get((fam, current.set_id)) == backends:
                return current.set_id, self.programmed.starts[(fam, current.set_id)]
        table = self._tables[fam].backends
        n = len(backends)
        start = self._ranges[fam].allocate(n)
        if start is None:
            self._unref_candidates.update(self.programmed.sets)  # under pressure, look at all
            self._collect_unreferenced_sets()
            start = self._ranges[fam].allocate(n)
            if start is None:
                raise errors.MapFull(table.name, table.max_entries)
        set_id = self._allocate_set_id()
        written = 0
        if self._batch is not None and self._owner is not None:
            self._batch.sets[(fam, set_id)] = (start, backends, self._owner)  # written by `_flush`
            written = n
        else:
            try:
                for i, backend in enumerate(backends):
                    table.put(start + i, tables.BackendSlot(set_id, backend))
                    written += 1
            except errors.MapFull:
                for i in range(written):
                    table.delete(start + i)
                self._ranges[fam].free(start, n)
                raise
            finally:
                self._writes += written
        self.programmed.slots[fam] += written
        self.programmed.sets[(fam, set_id)] = backends
        self.programmed.starts[(fam, set_id)] = start
        self._unref_candidates.add((fam, set_id))  # collected if no frontend ends up using it
        return set_id, start

    def _collect_unreferenced_sets(self) -> None:
        if self._first_pass:
            for fam in self._tables:
                if self._has_stray_slots(fam):
                    self._clear_stray_slots(fam)
        candidates, self._unref_candidates = self._unref_candidates, set()
        for fam, set_id in candidates:
            backends = self.programmed.sets.get((fam, set_id))
            if backends is None or self._set_refs[(fam, set_id)] > 0:
                continue
            start = self.programmed.starts.pop((fam, set_id))
            if self._batch is not None and self._batch.sets.pop((fam, set_id), None) is not None:
                pass  # never written: nothing to clear (see `_Batch`)
            else:
                for i in range(len(backends)):
                    self._tables[fam].backends.delete(start + i)
                self._deletes += len(backends)
            self._ranges[fam].free(start, len(backends))
            self.programmed.slots[fam] -= len(backends)
            del self.programmed.sets[(fam, set_id)]

    def _has_stray_slots(self, fam: int) -> bool:
        complete = sum(len(b) for (f, _), b in self.programmed.sets.items() if f == fam)
        return self.programmed.slots[fam] != complete

    def _clear_stray_slots(self, fam: int) -> None:
        """Slots no complete set covers: left by a writer that died mid-write, or by a set whose
        frontends are gone. No frontend can use them."""
        covered = {self.programmed.starts[(f, set_id)] + i
                   for (f, set_id), backends in self.programmed.sets.items() if f == fam
                   for i in range(len(backends))}
        table = self._tables[fam].backends
        for idx, _ in table.items():
            if idx not in covered:
                table.delete(idx)
                self._deletes += 1
        self.programmed.slots[fam] = len(covered)

    # --- source ranges ------------------------------------------------------------------------

    def _add_source_ranges(self, fam: int, svc_id: int, ranges: Collection[desired.SourceRange]) -> None:
        """Writes the ranges the service port's frontends are about to rely on."""
        if not ranges:
            return  # most service ports: nothing to look up (10k set differences at start-up)
        have = self.programmed.source_ranges.get((fam, svc_id), set())
        missing = sorted(set(ranges) - have, key=_network_order)
        if not missing:
            return
        self.programmed.source_ranges[(fam, svc_id)] = have
        table = self._tables[fam].source_ranges
        if self._range_count[fam] + len(missing) > table.max_entries:
            raise errors.MapFull(table.name, table.max_entries)
        for network in missing:
            table.put(tables.SourceRangeKey(svc_id, network), True)
            have.add(network)
            self._range_count[fam] += 1
            self._writes += 1

    def _delete_source_ranges(self, svc_id: int, *, keep: Collection[desired.SourceRange],
                              fam: int | None = None) -> None:
        """Deletes the service port's ranges not in `keep`, once no frontend relies on them."""
        for f in (fam,) if fam is not None else tuple(self._tables):
            have = self.programmed.source_ranges.get((f, svc_id))
            if not have:
                continue
            for network in sorted(have - set(keep), key=_network_order):
                self._tables[f].source_ranges.delete(tables.SourceRangeKey(svc_id, network))
                have.discard(network)
                self._range_count[f] -= 1
                self._deletes += 1
            if not have:
                del self.programmed.source_ranges[(f, svc_id)]

    def _delete_unowned_source_ranges(self) -> None:
        """Adoption: the ranges of ids no service port holds now (left by a service port that
        went while no agent ran). A service port's own stale ranges went when it was programmed."""
        for fam, svc_id in list(self.programmed.source_ranges):
            if svc_id not in self.service_of:
                self._delete_source_ranges(svc_id, keep=(), fam=fam)

    # --- a pass from empty: the batched writes ------------------------------------------------

    def _flush(self, problems: list[model.Problem]) -> None:
        """Writes what the pass collected: backend slots, then members, then frontends (see
        `_Batch`). A service port one of whose writes the kernel refused is reported, and
        none of its frontends is written."""
        self._collect_unreferenced_sets()  # sets whose frontends did not fit: never written
        batch, self._batch = self._batch, None
        assert batch is not None
        failed: dict[desired.ServicePortName, errors.MapFull] = {}
        for fam, t in self._tables.items():
            sets = [(start, set_id, backends, owner)
                    for (f, set_id), (start, backends, owner) in batch.sets.items() if f == fam]
            self._write_sets(t.backends, sets, failed)
        for fam, t in self._tables.items():
            members = [(key, True, owner) for key, owner in batch.members.items()
                       if key.backend.address.version == fam]
            unwritten = self._write_batch(t.members, members, failed)
            for key in unwritten:  # never written: the shadow must not claim them
                self.programmed.members.discard(key)
                self._member_count[fam] -= 1
        for name, exc in sorted(failed.items(), key=operator.itemgetter(0)):
            self._drop_queued_frontends(batch.frontends.get(name, ()))
            problems.append(_not_programmed(name, exc))
            self.failed.add(name)
            self._applied.pop(name, None)
        for t in self._tables.values():
            t.frontends.flush()

    def _write_sets(self, table: tables.BackendTable,
                    sets: list[tuple[int, int, tuple[desired.Backend, ...], desired.ServicePortName]],
                    failed: dict[desired.ServicePortName, errors.MapFull]) -> None:
        """Writes the pass's backend sets (first slot, set id, backends, owner) in batches, packed
        straight from the backends. Should the kernel stop part way, the slots from there on go
        through `_write_batch`, which finds whose write failed."""
        done = table.put_sets([(start, set_id, backends) for start, set_id, backends, _ in sets])
        self._writes += done
        if done == sum(len(backends) for _, _, backends, _ in sets):
            return
        slots = [(start + i, tables.BackendSlot(set_id, backend), owner)
                 for start, set_id, backends, owner in sets for i, backend in enumerate(backends)]
        self._write_batch(table, slots[done:], failed)

    def _write_batch(self, table: tables.Table, items: list[tuple[object, object, desired.ServicePortName]],
                     failed: dict[desired.ServicePortName, errors.MapFull]) -> list[object]:
        """Writes `items` in batches. Where the kernel stops, the entry it stopped at is written
        alone, which names the error; if that fails too, its owner is failed and the rest of
        that owner's entries are skipped. Returns the keys not written."""
        unwritten: list[object] = []
        todo = items
        while todo:
            done = table.put_many([(key, value) for key, value, _ in todo])
            self._writes += done
            if done == len(todo):
                break
            key, value, owner = todo[done]
            try:
                table.put(key, value)
            except errors.MapFull as exc:
                failed.setdefault(owner, exc)
                unwritten.append(key)
            else:
                self._writes += 1
            rest = todo[done + 1:]
            unwritten += [key for key, _, who in rest if who in failed]
            todo = [item for item in rest if item[2] not in failed]
        return unwritten

    def _drop_queued_frontends(self, frontends: Iterable[desired.Frontend]) -> None:
        """Forgets frontends the batch would have added: they were never written."""
        for fe in frontends:
            self._tables[fe.address.version].frontends.cancel(fe)
            self._forget_frontend(fe)
            self._writes -= 1

    # --- affinity members ---------------------------------------------------------------------

    def _ensure_members(self, fam: int, svc_id: int, backends: tuple[desired.Backend, ...]) -> None:
        table = self._tables[fam].members
        missing = [tables.MemberKey(svc_id, b) for b in backends
                   if tables.MemberKey(svc_id, b) not in self.programmed.members]
        if self._member_count[fam] + len(missing) > table.max_entries:
            raise errors.MapFull(table.name, table.max_entries)
        for key in missing:
            if self._batch is not None and self._owner is not None:
                self._batch.members[key] = self._owner  # written by `_flush`, counted there
            else:
                table.put(key, True)
                self._writes += 1
            self.programmed.members.add(key)
            self._member_count[fam] += 1

    def _delete_stale_members_of(self, previous: Mapping[desired.ServicePortName, desired.ServicePortState], *,
                                 changed: Mapping[desired.ServicePortName, desired.ServicePortState],
                                 ids: Mapping[desired.ServicePortName, int]) -> None:
        """The members changed or removed service ports no longer need. A service port that
        failed keeps the members its frontends may still rely on."""
        for name, old in previous.items():
            if old.affinity_timeout is None or name in self.failed:
                continue
            new = changed.get(name)
            keep = _all_backends(new) if new is not None and new.affinity_timeout is not None else set()
            for backend in _all_backends(old):
                key = tables.MemberKey(ids[name], backend)
                if backend not in keep and key in self.programmed.members:
                    self._delete_member(key)

    def _delete_member(self, key: tables.MemberKey) -> None:
        self._tables[key.backend.address.version].members.delete(key)
        self.programmed.members.discard(key)
        self._member_count[key.backend.address.version] -= 1
        self._deletes += 1

    def _delete_stale_members(self, state: desired.DesiredState) -> None:
        """Adoption: every member the desired state does not want."""
        wanted = {
            tables.MemberKey(self.svc_ids[name], b)
            for name, sp in state.service_ports.items()
            if sp.affinity_timeout is not None and name not in self.failed
            for b in _all_backends(sp)
        }
        # A service port that failed keeps the members its frontends may still rely on.
        kept = {self.svc_ids[name] for name in self.failed}
        for key in [m for m in self.programmed.members if m not in wanted and m.svc_id not in kept]:
            self._delete_member(key)


def _network_order(network: desired.SourceRange) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


@dataclass(slots=True)
class _Batch:
    """The writes of a pass from empty maps, held until `Reconciler._flush` (kept per owning
    service port, so a write the kernel refuses fails that service port alone).

    Why writing them at the end, in batches, is as safe as writing each at once:
    - Every frontend is new (the maps held none), so no reader has a frontend that a write here
      could change under it, and a backend range taken here is free: no frontend points at it.
    - `_flush` writes all backend slots and members first, and the frontends only then: when a
      frontend turns visible (KernelFrontendTable.flush), its whole set is in the map. That is
      make-before-break for the pass as a whole instead of set by set.
    - A write the kernel refuses (a full map: only the members' hash can be, or an outside writer
      filled one) fails its service port before any of its frontends is written: they are
      dropped, and its sets, now unreferenced, are cleared at the end of the pass.
    - A set collected before the flush (its frontends did not fit) is taken out of the batch
      instead of being written and then zeroed; so a range freed and handed to another set in
      the same pass is written once, by its new set.
    """

    sets: dict[tuple[int, int], tuple[int, tuple[desired.Backend, ...], desired.ServicePortName]] = field(
        default_factory=dict)  # (family, set id) -> first slot, backends, owner
    members: dict[tables.MemberKey, desired.ServicePortName] = field(default_factory=dict)
    frontends: dict[desired.ServicePortName, list[desired.Frontend]] = field(default_factory=dict)


def _not_programmed(name: desired.ServicePortName, exc: errors.MapFull) -> model.Problem:
    log.warning("service_port_not_programmed", service_port=str(name), reason=str(exc))
    return model.Problem(ref=f"Service {name.namespace}/{name.name}",
                         reason=f"port {name.port or '<unnamed>'}/{name.protocol} ({name.family}) "
                                f"not programmed: {exc}")


def _all_backends(sp: desired.ServicePortState) -> set[desired.Backend]:
    return {b for group in sp.frontend_groups() for b in group.backends}
