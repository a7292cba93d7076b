"""Writes this node's pods into the pinned maps the socket programs consult.

Each pod with a cgroup gets an entry in `ctlb_pods`, keyed by its pod cgroup's id: its mode and
addresses. A meshed pod's capture rules (include/exclude ranges, excluded ports) sit in their own
maps under a small pod id. Changes are ordered so that a program never sees a half-written pod:
rules are written before the entry that points at them and deleted after it stops doing so.

The maps outlive the agent: a restarted agent adopts the pod ids it finds and, on its first
`apply`, removes whatever it no longer wants.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from ctlb import model
from ctlb.datapath import libbpf, maps, netorder
from meshredirect import switch

log = structlog.get_logger()

# enum pod_flags and enum mesh_range_kind (bpf/ctlb.h); tests/unit/test_header_copies.py checks them.
POD_F_MESH = 1 << 0
POD_F_INCLUDE_ALL = 1 << 1
POD_F_INCLUDE_RANGES = 1 << 2
POD_F_EXCLUDE_RANGES = 1 << 3
POD_F_EXCLUDE_PORTS = 1 << 4
MESH_RANGE_INCLUDE = 1
MESH_RANGE_EXCLUDE = 2
_RULE_PREFIX_BITS = 64  # pod_id and kind precede the address in an LPM key

# A rule: ("range", family, kind, network) or ("port", port).
_Rule = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    writes: int
    problems: tuple[model.Problem, ...] = ()


@dataclass(frozen=True, slots=True)
class PodPlacement:
    """A pod's mode and where its cgroup is."""

    mode: switch.PodMode
    cgroup_id: int
    level: int


class PodTable:
    def __init__(self, pinned: Mapping[str, maps.PinnedMap], settings: switch.MeshSettings) -> None:
        self._settings_map = pinned[maps.SETTINGS]
        self._pods = pinned[maps.PODS]
        self._ranges = {4: pinned[maps.MESH_RANGES[4]], 6: pinned[maps.MESH_RANGES[6]]}
        self._ports = pinned[maps.MESH_PORTS]
        self._settings = settings
        # What this table wrote, by cgroup id: the pod id, the entry's bytes and the rules.
        self._ids: dict[int, int] = {}
        self._entries: dict[int, bytes] = {}
        self._rules: dict[int, frozenset[_Rule]] = {}
        self._adopted = False
        self._node_settings: bytes = b""
        # ctlb_settings.generation: bumped with every change, which ends what the programs cached
        # of the pods; carried on from the map, so a restarted agent never repeats a value.
        self._generation = 0

    def apply(self, placements: Iterable[PodPlacement]) -> Outcome:
        """Makes the maps hold exactly `placements`, but for pods that do not fit."""
        if not self._adopted:
            self._adopt()
        wanted = {p.cgroup_id: p for p in placements}
        writes = 0
        for cgroup_id in [c for c in self._entries if c not in wanted]:
            writes += self._drop_pod(cgroup_id)
        problems: list[model.Problem] = []
        placed: list[PodPlacement] = []
        for cgroup_id, placement in wanted.items():
            try:
                writes += self._put_pod(cgroup_id, placement)
                placed.append(placement)
            except libbpf.BpfError as exc:
                # The pod keeps what it had, if anything: a full map never undoes a pod.
                mode = placement.mode
                problems.append(model.Problem(f"Pod {mode.namespace}/{mode.name}", f"not programmed: {exc}"))
        writes += self._put_node_settings(placed, pods_changed=writes > 0)
        return Outcome(writes=writes, problems=tuple(problems))

    def pod_id(self, cgroup_id: int) -> int | None:
        """The id the pod of this cgroup has in the maps, if it is there."""
        return self._ids.get(cgroup_id)

    # --- one pod ------------------------------------------------------------------------------

    def _put_pod(self, cgroup_id: int, placement: PodPlacement) -> int:
        new_pod = cgroup_id not in self._entries
        pod_id = self._ids.get(cgroup_id) or self._new_id()
        rules = _rules_of(placement.mode.capture)
        old_rules = self._rules.get(cgroup_id, frozenset())
        entry = bytes(self._encode_entry(pod_id, placement.mode))
        added = rules - old_rules
        written: list[_Rule] = []
        try:
            for rule in added:
                self._write_rule(pod_id, rule)
                written.append(rule)
            if self._entries.get(cgroup_id) != entry:
                self._pods.put(ct.c_uint64(cgroup_id), self._pods.layout.leaf.from_buffer_copy(entry))
        except libbpf.BpfError:
            for rule in written:  # the pod keeps what it had, and only that
                self._delete_rule(pod_id, rule)
            raise
        self._ids[cgroup_id] = pod_id
        writes = len(added) + (self._entries.get(cgroup_id) != entry)
        self._entries[cgroup_id] = entry
        for rule in old_rules - rules:
            self._delete_rule(pod_id, rule)
            writes += 1
        self._rules[cgroup_id] = rules
        if new_pod:
            log.debug("pod_programmed", pod=f"{placement.mode.namespace}/{placement.mode.name}",
                      meshed=placement.mode.meshed, cgroup_id=cgroup_id)
        return writes

    def _drop_pod(self, cgroup_id: int) -> int:
        self._pods.delete(ct.c_uint64(cgroup_id))
        pod_id = self._ids.pop(cgroup_id)
        rules = self._rules.pop(cgroup_id, frozenset())
        for rule in rules:
            self._delete_rule(pod_id, rule)
        del self._entries[cgroup_id]
        return 1 + len(rules)

    def _encode_entry(self, pod_id: int, mode: switch.PodMode) -> ct.Structure:
        entry = self._pods.layout.leaf()
        entry.pod_id = pod_id
        entry.flags = _flags_of(mode.capture)
        entry.sidecar_uid = self._settings.sidecar_uid
        entry.outbound_port = netorder.be16(self._settings.outbound_port)
        for ip in mode.ips:
            netorder.put_addr(entry, ip, "addr4" if ip.version == 4 else "addr6")
        return entry

    def _new_id(self) -> int:
        taken = set(self._ids.values())
        return next(i for i in itertools.count(1) if i not in taken)

    # --- rules --------------------------------------------------------------------------------

    def _rule_key(self, pod_id: int, rule: _Rule) -> tuple[maps.PinnedMap, ct.Structure]:
        if rule[0] == "port":
            key = self._ports.layout.key()
            key.pod_id = pod_id
            key.port = netorder.be16(int(rule[1]))  # type: ignore[call-overload]
            return self._ports, key
        _, family, kind, network = rule
        table = self._ranges[family]  # type: ignore[index]
        key = table.layout.key()
        key.prefixlen = _RULE_PREFIX_BITS + network.prefixlen  # type: ignore[attr-defined]
        key.pod_id = pod_id
        key.kind = kind
        netorder.put_addr(key, network.network_address)  # type: ignore[attr-defined]
        return table, key

    def _write_rule(self, pod_id: int, rule: _Rule) -> None:
        table, key = self._rule_key(pod_id, rule)
        table.put(key, ct.c_uint8(1))

    def _delete_rule(self, pod_id: int, rule: _Rule) -> None:
        table, key = self._rule_key(pod_id, rule)
        table.delete(key)

    # --- node-wide ----------------------------------------------------------------------------

    def _put_node_settings(self, placements: Iterable[PodPlacement], *, pods_changed: bool) -> int:
        """Writes the node-wide settings after the pods they describe: a new generation whenever
        a pod or a setting changed."""
        placed = list(placements)
        value = self._settings_map.layout.leaf()
        value.pod_levels = sum({1 << p.level for p in placed if 0 < p.level < 32})
        value.meshed_pods = sum(1 for p in placed if p.mode.meshed)
        value.generation = self._generation
        if bytes(value) == self._node_settings and not pods_changed:
            return 0
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        value.generation = self._generation
        self._settings_map.put(ct.c_uint32(0), value)
        self._node_settings = bytes(value)
        return 1

    # --- adoption -----------------------------------------------------------------------------

    def _adopt(self) -> None:
        """Takes over the pods a previous agent wrote: their ids stay, so their rules stay
        valid until this agent's first `apply` decides them again. Rules of ids no pod holds
        any more are removed."""
        for key, entry in self._pods.items():
            self._ids[int(key.value)] = int(entry.pod_id)
            self._entries[int(key.value)] = bytes(entry)
        settings = self._settings_map.get(ct.c_uint32(0))
        if settings is not None:
            self._generation = int(settings.generation)
            self._node_settings = bytes(settings)
        live = set(self._ids.values())
        by_id = {pod_id: cgroup_id for cgroup_id, pod_id in self._ids.items()}
        rules: dict[int, set[_Rule]] = {}
        for family, table in self._ranges.items():
            for key in list(table.keys()):
                rule = ("range", family, int(key.kind), _network_of(key, family))
                self._adopt_rule(table, key, int(key.pod_id), rule, live, by_id, rules)
        for key in list(self._ports.keys()):
            rule = ("port", netorder.from_be16(int(key.port)))
            self._adopt_rule(self._ports, key, int(key.pod_id), rule, live, by_id, rules)
        self._rules = {cgroup_id: frozenset(r) for cgroup_id, r in rules.items()}
        self._adopted = True
        if self._ids:
            log.info("pods_adopted", pods=len(self._ids))

    @staticmethod
    def _adopt_rule(table: maps.PinnedMap, key: ct.Structure, pod_id: int, rule: _Rule, live: set[int],
                    by_id: Mapping[int, int], rules: dict[int, set[_Rule]]) -> None:
        if pod_id not in live:
            table.delete(key)
            return
        rules.setdefault(by_id[pod_id], set()).add(rule)


def _flags_of(capture: switch.Capture | None) -> int:
    if capture is None:
        return 0
    flags = POD_F_MESH
    if capture.include is None:
        flags |= POD_F_INCLUDE_ALL
    elif capture.include:
        flags |= POD_F_INCLUDE_RANGES
    if capture.exclude:
        flags |= POD_F_EXCLUDE_RANGES
    if capture.exclude_ports:
        flags |= POD_F_EXCLUDE_PORTS
    return flags


def _rules_of(capture: switch.Capture | None) -> frozenset[_Rule]:
    if capture is None:
        return frozenset()
    rules: set[_Rule] = {("range", n.version, MESH_RANGE_INCLUDE, n) for n in capture.include or ()}
    rules.update(("range", n.version, MESH_RANGE_EXCLUDE, n) for n in capture.exclude)
    rules.update(("port", port) for port in capture.exclude_ports)
    return frozenset(rules)


def _network_of(key: ct.Structure, family: int) -> switch.Network:
    address = netorder.get_addr(key, family)
    return ipaddress.ip_network(f"{address}/{int(key.prefixlen) - _RULE_PREFIX_BITS}")
