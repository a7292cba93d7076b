"""End-to-end fixtures: a lab node whose client pod has a real Envoy sidecar fed by the xDS server.

The BPF redirect is stood in for by iptables in the client pod (`ctlb.lab.envoy.redirect_outbound`):
the app's connections go to the sidecar's 15001, conntrack answers SO_ORIGINAL_DST. The Service
objects go through the same store and planner the agent uses, and `XdsServer.publish`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ctlb import kubeobjects, lab as ctlb_lab, model, planner
from ctlb.lab import envoy, servers
from ctlb.sources import store
from meshredirect.xds import Options, XdsServer, snapshot
from tests.kernel.conftest import cluster, require_bcc  # noqa: F401 (fixtures: the real agent on a lab)

NODE_NAME = "lab-node"


class Mesh:
    """One lab, the xDS server on a Unix socket, backend pods, and a client pod with a sidecar."""

    def __init__(self, the_lab: ctlb_lab.Lab, *, socket_dir: pathlib.Path, log_dir: pathlib.Path) -> None:
        self.lab = the_lab
        self.socket = socket_dir / "xds.sock"
        self.address = f"unix:{self.socket}"
        self.log_dir = log_dir
        self.objects = store.ObjectStore()
        self.planner = planner.Planner(NODE_NAME)
        self.server: XdsServer | None = None
        self.sidecar: envoy.Sidecar | None = None
        self.client: ctlb_lab.Pod | None = None

    # --- the control plane ------------------------------------------------------------------------

    def start_server(self) -> XdsServer:
        """Starts a server on the socket and serves what the store holds, as the agent would
        after its first sync (with no Services: the passthrough listener alone)."""
        self.server = XdsServer([self.address], options=Options(access_log=True))
        self.server.start()
        self.publish()
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None

    def apply(self, *manifests: dict[str, Any], publish: bool = True) -> snapshot.Snapshot | None:
        """Puts objects (as `kubectl get -o yaml` prints them) in the store, plans, publishes."""
        for manifest in manifests:
            self.objects.put(kubeobjects.parse(manifest))
        self.planner.update(self.objects, self.objects.take())
        return self.publish() if publish else None

    def publish(self) -> snapshot.Snapshot:
        assert self.server is not None
        return self.server.publish(self.planner.state().service_ports, self.services())

    def services(self) -> list[model.Service]:
        return [s for s in self.objects.objects("Service") if isinstance(s, model.Service)]

    # --- pods -------------------------------------------------------------------------------------

    def backend(self, name: str, *, ipv6: bool = True) -> ctlb_lab.Pod:
        pod = self.lab.add_pod(name, ipv6=ipv6)
        servers.start_http(pod, name=name, port=8080)
        return pod

    def meshed_client(self) -> envoy.Sidecar:
        """The client pod with its sidecar up (listener served) and the redirect in place."""
        self.client = self.lab.add_pod("client", ipv6=True)
        self.sidecar = envoy.start_sidecar(self.client, xds_address=self.address, log_dir=self.log_dir,
                                           node_id="sidecar~client.default", cluster="default")
        self.sidecar.wait_live()
        envoy.redirect_outbound(self.client)
        return self.sidecar

    def curl(self, url: str) -> dict[str, Any]:
        """What the app in the client pod gets from `url`: the echo's JSON."""
        assert self.client is not None
        done = self.client.run(["curl", "-sS", "-g", "--fail", "--max-time", "5", url], timeout=10)
        assert done.returncode == 0, f"curl {url}: {done.stderr.strip()}\n{self.sidecar_log()}"
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def sidecar_log(self) -> str:
        return self.sidecar.log()[-4000:] if self.sidecar is not None else ""

    def close(self) -> None:
        self.stop_server()


@pytest.fixture
def require_envoy(unavailable: Callable[[str], None]) -> None:
    try:
        envoy.envoy_binary()
    except ctlb_lab.LabError as exc:
        unavailable(str(exc))


@pytest.fixture
def socket_dir() -> Iterator[pathlib.Path]:
    """A folder the sidecar's UID can reach (pytest's tmp_path is root-only)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="ctlb-xds-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mesh(lab: ctlb_lab.Lab, require_envoy: None, socket_dir: pathlib.Path,
         tmp_path: pathlib.Path) -> Iterator[Mesh]:
    the_mesh = Mesh(lab, socket_dir=socket_dir, log_dir=tmp_path)
    try:
        yield the_mesh
    finally:
        the_mesh.close()
