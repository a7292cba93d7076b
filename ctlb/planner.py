"""The desired state, kept current as objects change: `semantics` applied to what moved only.

The planner holds each Service's service-port states and who claims each frontend. A change to
one EndpointSlice recomputes that slice's Service and touches the service ports whose frontends
it shares; nothing walks all Services again, so one change costs the same at 10 Services or 10k.

It also owns the one rule that spans Services: a frontend claimed by two service ports belongs to
the first by namespace/name (and, within a Service, by port order); the other keeps the rest of
its frontends and is reported. kube-proxy would program both and let the first rule win; ctlb
must choose one, and says so.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import msgspec

from ctlb import desired, model, semantics
from ctlb.sources import store

_ServiceKey = tuple[str, str]
# Claim order: the claiming Service's namespace and name, then the state's index within it.
_Order = tuple[str, str, int]
# Service ports whose desired state moved, with the state each had before (None: new).
Moved = dict[desired.ServicePortName, desired.ServicePortState | None]


class Planner:
    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._raw: dict[_ServiceKey, list[desired.ServicePortState]] = {}
        self._raw_by_name: dict[desired.ServicePortName, desired.ServicePortState] = {}
        self._claims: dict[desired.Frontend, list[tuple[_Order, desired.ServicePortName]]] = {}
        self._kept: dict[desired.ServicePortName, desired.ServicePortState] = {}
        self._conflicts: dict[desired.ServicePortName, list[model.Problem]] = {}
        # Services an update while listing left for later (see `update`).
        self._waiting: set[_ServiceKey] = set()
        self.frontend_count = 0
        # Services with a health check served on this node; the version moves when they change.
        self._health_checks: dict[_ServiceKey, semantics.HealthCheck] = {}
        self.health_checks_version = 0

    def update(self, objects: store.ObjectStore, changes: store.Changes | None, *, listing: bool = False) -> Moved:
        """Brings the plan up to date with `objects`.

        Args:
            objects: the store, read under its lock by the caller.
            changes: what changed since the last update; None recomputes every Service.
            listing: the source is still listing everything, and this plans ahead of the first
                sync with what has come so far. Services none of whose EndpointSlices has come
                yet, and all of them while this node's Node has not, wait for a later update:
                planned now, they would most likely be planned again when those come. An
                update without `listing` plans whatever waits, so the plan is then complete.

        Returns:
            The service ports whose desired state was added, changed or removed, each with the
            state it had before (None if it is new).
        """
        held = objects.get(("Node", "", self.node_name))
        # Without its Node object this node still has its name, which node-local endpoints and
        # node hints need (kube-proxy knows it from its flags); it has no addresses or zone.
        node = held if isinstance(held, model.Node) else model.Node(name=self.node_name, addresses=())
        services = self._dirty_services(objects, changes)
        if listing:
            # A waiting Service can only become ready by a change to one of its slices, or by
            # the Node coming, either of which makes it dirty: the waiting need no second look.
            ready = {key for key in services if objects.has_slices(*key)} if isinstance(held, model.Node) else set()
            self._waiting.difference_update(ready)
            self._waiting.update(services - ready)
            services = ready
        else:
            services |= self._waiting
            self._waiting = set()
        touched: set[desired.ServicePortName] = set()
        contested: set[desired.Frontend] = set()
        for key in sorted(services):
            touched.update(self._recompute(key, objects, node=node, contested=contested))
        for frontend in contested:
            touched.update(name for _, name in self._claims.get(frontend, ()))
        moved: Moved = {}
        for name in touched:
            previous = self._kept.get(name)
            if self._settle(name):
                moved[name] = previous
        return moved

    def state(self) -> desired.DesiredState:
        """The current plan. The mapping is the planner's own: read it before the next update."""
        problems = sorted({p for group in self._conflicts.values() for p in group})
        return desired.DesiredState(service_ports=self._kept, problems=tuple(problems))

    def health_checks(self) -> dict[_ServiceKey, semantics.HealthCheck]:
        """The health checks to serve, by Service (namespace, name): a copy."""
        return dict(self._health_checks)

    # --- which Services to recompute --------------------------------------------------------

    def _dirty_services(self, objects: store.ObjectStore, changes: store.Changes | None) -> set[_ServiceKey]:
        if changes is None:
            return self._every_service(objects)
        dirty: set[_ServiceKey] = set()
        for key, before in changes.before.items():
            kind, namespace, name = key
            if kind == "Service":
                dirty.add((namespace, name))
            elif kind == "EndpointSlice":
                # Both the Service it belonged to and the one it belongs to now.
                for obj in (before, objects.get(key)):
                    if isinstance(obj, model.EndpointSlice):
                        dirty.add((namespace, obj.service_name))
            elif kind == "Node" and name == self.node_name and _node_moved(before, objects.get(key)):
                return self._every_service(objects)  # node addresses and zone reach every Service
        return dirty

    def _every_service(self, objects: store.ObjectStore) -> set[_ServiceKey]:
        return {(ns, name) for _, ns, name in objects.keys("Service")} | set(self._raw)

    def _recompute(self, key: _ServiceKey, objects: store.ObjectStore, *, node: model.Node,
                   contested: set[desired.Frontend]) -> set[desired.ServicePortName]:
        """Recomputes one Service; returns its old and new service-port names, and adds to
        `contested` every frontend it claimed or claims that another Service claims too."""
        service = objects.get(("Service", *key))
        new: list[desired.ServicePortState] = []
        if isinstance(service, model.Service) and semantics.is_proxied(service):
            new = semantics.service_port_states(service, slices=objects.slices_of(*key), node=node)
        self._plan_health_check(key, service if isinstance(service, model.Service) else None, objects)
        old = self._raw.get(key, [])
        # Equal results keep the old values, so later stages can tell by identity that nothing moved.
        old_by_name = {state.name: state for state in old}
        new = [old_by_name[s.name] if old_by_name.get(s.name) == s else s for s in new]
        if len(new) == len(old) and all(a is b for a, b in zip(new, old)):
            return set()
        self._unclaim(key, old)
        self._claim(key, new)
        for state in old:
            del self._raw_by_name[state.name]
            self._note_contested(key, state.frontends, contested)
        for state in new:
            self._raw_by_name[state.name] = state
            self._note_contested(key, state.frontends, contested)
        if new:
            self._raw[key] = new
        else:
            self._raw.pop(key, None)
        return {state.name for state in old} | {state.name for state in new}

    def _plan_health_check(self, key: _ServiceKey, service: model.Service | None, objects: store.ObjectStore) -> None:
        check = None
        if service is not None and semantics.needs_health_check(service):
            check = semantics.health_check(service, slices=objects.slices_of(*key), node_name=self.node_name)
        if self._health_checks.get(key) == check:
            return
        if check is None:
            del self._health_checks[key]
        else:
            self._health_checks[key] = check
        self.health_checks_version += 1

    # --- frontend claims --------------------------------------------------------------------

    def _note_contested(self, key: _ServiceKey, frontends: Iterable[desired.Frontend],
                        contested: set[desired.Frontend]) -> None:
        """Adds the frontends claimed (now) more than once, or by another Service: only their
        claimants' ownership can move with this Service. The rest (nearly all) would only
        touch this Service's own service ports, which the caller touches anyway."""
        claims = self._claims
        for frontend in frontends:
            held = claims.get(frontend)
            if held and (len(held) > 1 or held[0][0][:2] != key):
                contested.add(frontend)

    def _claim(self, key: _ServiceKey, states: list[desired.ServicePortState]) -> None:
        for index, state in enumerate(states):
            for frontend in state.frontends:
                bisect.insort(self._claims.setdefault(frontend, []), ((*key, index), state.name))

    def _unclaim(self, key: _ServiceKey, states: list[desired.ServicePortState]) -> None:
        for index, state in enumerate(states):
            for frontend in state.frontends:
                claims = self._claims[frontend]
                claims.remove(((*key, index), state.name))
                if not claims:
                    del self._claims[frontend]

    def _settle(self, name: desired.ServicePortName) -> bool:
        """Gives `name` the frontends it owns; True if its desired state changed."""
        raw = self._raw_by_name.get(name)
        previous = self._kept.get(name)
        kept, problems = (None, []) if raw is None else self._owned(raw)
        if problems:
            self._conflicts[name] = problems
        else:
            self._conflicts.pop(name, None)
        if kept is None:
            if previous is None:
                return False
            self.frontend_count -= len(previous.frontends)
            del self._kept[name]
            return True
        if previous is not None and previous == kept:
            return False
        self.frontend_count += len(kept.frontends) - (len(previous.frontends) if previous else 0)
        self._kept[name] = kept
        return True

    def _owned(self, raw: desired.ServicePortState) -> tuple[desired.ServicePortState | None, list[model.Problem]]:
        claims, name = self._claims, raw.name
        # The common case first, cheaply: it owns every frontend it claims (its claims hold this
        # very name object, so identity settles most comparisons).
        if all((owner := claims[frontend][0][1]) is name or owner == name for frontend in raw.frontends):
            return raw, []
        owned: dict[desired.Frontend, desired.FrontendKind] = {}
        problems: list[model.Problem] = []
        for frontend, kind in raw.frontends.items():
            owner = self._claims[frontend][0][1]
            if owner == raw.name:
                owned[frontend] = kind
            else:
                problems.append(_conflict_problem(raw.name, frontend=frontend, owner=owner))
        if len(owned) == len(raw.frontends):
            return raw, problems
        # A service port left with no frontend is dropped: nothing could reach it.
        return (msgspec.structs.replace(raw, frontends=owned) if owned else None), problems


def _node_moved(before: model.KubeObject | None, after: model.KubeObject | None) -> bool:
    """Whether this node changed in what the service-port states read: its name's presence, its
    addresses and labels (not its taints or deletion, which only the health server reads)."""
    if not isinstance(before, model.Node) or not isinstance(after, model.Node):
        return True
    return (before.addresses, before.labels) != (after.addresses, after.labels)


def _conflict_problem(
    loser: desired.ServicePortName, *, frontend: desired.Frontend, owner: desired.ServicePortName
) -> model.Problem:
    ref = model.ObjectRef("Service", loser.namespace, loser.name)
    reason = f"frontend {frontend} already used by Service {owner.namespace}/{owner.name}"
    return model.Problem(ref=str(ref), reason=reason)


def desired_state(
    *,
    services: Iterable[model.Service],
    endpoint_slices: Iterable[model.EndpointSlice],
    node: model.Node | None,
) -> desired.DesiredState:
    """The desired state of a set of objects, planned once: for tests and one-off readers."""
    objects = store.ObjectStore()
    for obj in (*services, *endpoint_slices, *((node,) if node is not None else ())):
        objects.put(obj)
    planner = Planner(node.name if node is not None else "")
    planner.update(objects, None)
    state = planner.state()
    return desired.DesiredState(service_ports=dict(sorted(state.service_ports.items())), problems=state.problems)
