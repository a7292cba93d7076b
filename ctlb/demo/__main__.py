"""`python -m ctlb.demo`: builds a lab node with pods, runs `ctlb agent` on the shipped manifests,
sends requests to the Service addresses, prints which backend answered each, and cleans up.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import yaml

from ctlb import lab as ctlb_lab, statefile
from ctlb.lab import envoy, errors as lab_errors, servers

MANIFESTS = pathlib.Path(__file__).parent / "manifests" / "demo.yaml"
WEB_PODS = ("web-0", "web-1", "web-2")
DNS_PODS = ("dns-0", "dns-1")
MESH_NAMESPACE = "mall"  # labelled ctlb.io/mesh=enabled: its pods go through their Envoy sidecar
WEB_CLUSTER = "outbound|80|v4|web.shop"  # the sidecar's cluster for Service shop/web


def say(text: str = "") -> None:
    print(text, flush=True)


def ctlb(*args: str, run_dir: pathlib.Path, bpffs: pathlib.Path) -> str:
    out = subprocess.run([sys.executable, "-m", "ctlb.cli.main", *args, "--bpffs", str(bpffs),
                          "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def curl(place: ctlb_lab.Place, url: str) -> str:
    out = place.run(["curl", "--noproxy", "*", "-sS", "--max-time", "3", url], timeout=10)
    if out.returncode != 0:
        return f"failed: {out.stderr.strip()}"
    body = json.loads(out.stdout)
    return f"{body['backend']}  (it saw the client as {body['peer']})"


def build_pods(the_lab: ctlb_lab.Lab) -> ctlb_lab.Pod:
    for name in WEB_PODS:
        pod = the_lab.add_pod(name, namespace="shop", ipv6=True)
        servers.start_http(pod, name=name, port=8080)
    for name in DNS_PODS:
        pod = the_lab.add_pod(name, namespace="kube-system")
        servers.start_dnsmasq(pod, name=name)
    client = the_lab.add_pod("client", namespace="shop", ipv6=True)
    the_lab.add_pod("mesh-app", namespace=MESH_NAMESPACE)
    want = {"web-0": "10.244.0.2", "web-1": "10.244.0.3", "web-2": "10.244.0.4", "dns-0": "10.244.0.5",
            "dns-1": "10.244.0.6"}
    got = {name: str(pod.ipv4) for name, pod in the_lab.pods.items() if name in want}
    if got != want:
        raise SystemExit(f"demo: pods got {got}, the manifests expect {want}")
    return client


def pod_manifests(the_lab: ctlb_lab.Lab) -> list[dict]:
    """The Namespaces and this node's Pods, as the API would list them: the mesh switch needs
    each pod's UID, which names its cgroup, so they are written once the lab pods exist."""
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
                  {"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": MESH_NAMESPACE, "labels": {"ctlb.io/mesh": "enabled"}}}]
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
             "spec": {"nodeName": "demo-node"},
             "status": {"phase": "Running", "podIPs": [{"ip": str(a)} for a in pod.addresses]}}
            for pod in the_lab.pods.values()]
    return namespaces + pods


def mesh_demo(the_lab: ctlb_lab.Lab, client: ctlb_lab.Pod, *, xds: str, work: pathlib.Path) -> None:
    """A pod of the meshed namespace beside the plain client: its connections reach its Envoy,
    which the agent configures; the client's keep connect-time load balancing."""
    app = the_lab.pods["mesh-app"]
    say(f"== the mesh: namespace {MESH_NAMESPACE} is labelled ctlb.io/mesh=enabled; pod mesh-app runs Envoy "
        "as uid 1337, configured by the agent's xDS server ==")
    try:
        sidecar = envoy.start_sidecar(app, xds_address=xds, log_dir=work, node_id="sidecar~mesh-app.mall")
        sidecar.wait_live()
        sidecar.wait_for("web's endpoints", lambda: sidecar.clusters().get(WEB_CLUSTER) or None)
    except lab_errors.LabError as exc:
        say(f"   Envoy did not start ({exc}); skipping the mesh part")
        return
    say(f"   Envoy's cluster {WEB_CLUSTER}: {', '.join(sidecar.clusters()[WEB_CLUSTER])}")
    for _ in range(3):
        say(f"   mesh-app: curl http://10.96.0.10/  -> {curl(app, 'http://10.96.0.10/')}   via Envoy")
    served = sidecar.stats(f"cluster.{WEB_CLUSTER}.").get(f"cluster.{WEB_CLUSTER}.upstream_rq_completed", 0)
    say(f"   Envoy counted {served} requests on {WEB_CLUSTER}: it saw 10.96.0.10:80, the Service address")
    say(f"   client:   curl http://10.96.0.10/  -> {curl(client, 'http://10.96.0.10/')}   CTLB, no Envoy")


def wait_for_sync(run_dir: pathlib.Path, agent: subprocess.Popen[bytes], *, after: int) -> statefile.AgentState:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise SystemExit(f"demo: the agent exited with {agent.returncode}")
        st = statefile.read(run_dir)
        if st is not None and st.pid == agent.pid and st.syncs > after:
            return st
        time.sleep(0.05)
    raise SystemExit("demo: the agent did not sync within 30 s")


def spread(client: ctlb_lab.Pod, url: str, count: int) -> dict[str, int]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        seen[curl(client, url).split()[0]] += 1
    return dict(sorted(seen.items()))


def drop_endpoint(manifest: pathlib.Path, address: str) -> None:
    docs = list(yaml.safe_load_all(manifest.read_text()))
    for doc in docs:
        if doc.get("kind") == "EndpointSlice":
            doc["endpoints"] = [e for e in doc["endpoints"] if address not in e["addresses"]]
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    os.replace(tmp, manifest)


def trace_demo(client: ctlb_lab.Pod, *, run_dir: pathlib.Path, bpffs: pathlib.Path) -> None:
    """A curl, a dig and a refused curl from the client pod, as `ctlb socket-trace` saw them."""
    say("== ctlb socket-trace --pod shop/client, while the client pod curls, digs and is refused ==")
    trace = subprocess.Popen([sys.executable, "-m", "ctlb.cli.main", "socket-trace", "--pod", "shop/client",
                              "--bpffs", str(bpffs), "--run-dir", str(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert trace.stderr is not None
    started = trace.stderr.readline()
    if not started.startswith("tracing"):
        trace.kill()
        say(f"   socket-trace did not start: {started}{trace.stderr.read()}")
        return
    curl(client, "http://10.96.0.10/")
    client.run(["dig", "@10.96.0.53", servers.DNS_WHOAMI, "TXT", "+short", "+time=2", "+tries=1"])
    curl(client, "http://10.96.0.20/")
    trace.send_signal(signal.SIGINT)
    out, err = trace.communicate(timeout=30)
    for line in out.splitlines():
        say(f"   {line}")
    if trace.returncode:
        say(f"   socket-trace exited {trace.returncode}: {err.strip()}")


def demo(the_lab: ctlb_lab.Lab, work: pathlib.Path, bpffs: pathlib.Path, xds_dir: pathlib.Path) -> None:
    run_dir = work / "run"
    manifests = work / "manifests"
    manifests.mkdir()
    manifest = manifests / "demo.yaml"
    shutil.copy(MANIFESTS, manifest)

    say("== building a lab node: pods web-0..2 (HTTP), dns-0..1 (dnsmasq), client, mesh-app ==")
    client = build_pods(the_lab)
    say(f"   node {the_lab.node.ipv4}, client pod {client.ipv4} / {client.ipv6}")
    (manifests / "pods.yaml").write_text(yaml.safe_dump_all(pod_manifests(the_lab), sort_keys=False))
    xds = f"unix:{xds_dir / 'xds.sock'}"

    say(f"== starting: ctlb agent --manifests {manifests} --cgroup {the_lab.cgroup_root} --xds-listen {xds} ==")
    log = (work / "agent.log").open("wb")
    agent = subprocess.Popen([sys.executable, "-m", "ctlb.cli.main", "agent", "--manifests", str(manifests),
                              "--node-name", "demo-node", "--cgroup", str(the_lab.cgroup_root),
                              "--bpffs", str(bpffs), "--run-dir", str(run_dir), "--xds-listen", xds,
                              # Any free port on loopback (`ctlb status` shows which): never the
                              # node's 10256, which a real kube-proxy or agent may hold.
                              "--healthz-bind-address", "127.0.0.1:0", "--log-json"],
                             stdout=log, stderr=log)
    try:
        st = wait_for_sync(run_dir, agent, after=0)
        say()
        say(ctlb("services", run_dir=run_dir, bpffs=bpffs))

        say("== TCP to the ClusterIP from the client pod: each connection balanced at connect() ==")
        for _ in range(6):
            say(f"   curl http://10.96.0.10/          -> {curl(client, 'http://10.96.0.10/')}")
        say(f"   curl http://[fd00:10:96::10]/   -> {curl(client, 'http://[fd00:10:96::10]/')}")
        say(f"   from the node, NodePort 10.244.0.1:30080 -> {curl(the_lab.node, 'http://10.244.0.1:30080/')}")
        say(f"   30 connections spread: {spread(client, 'http://10.96.0.10/', 30)}")

        say("== DNS over UDP to the kube-dns ClusterIP (replies come back from 10.96.0.53) ==")
        for _ in range(4):
            out = client.run(["dig", "@10.96.0.53", servers.DNS_WHOAMI, "TXT", "+short", "+time=2", "+tries=1"])
            say(f"   dig @10.96.0.53 {servers.DNS_WHOAMI} TXT -> {out.stdout.strip() or out.stderr.strip()}")

        say("== a Service with no endpoints is refused, like kube-proxy's REJECT ==")
        say(f"   curl http://10.96.0.20/          -> {curl(client, 'http://10.96.0.20/')}")

        trace_demo(client, run_dir=run_dir, bpffs=bpffs)

        say("== removing web-2 from the EndpointSlice: the agent reloads the file ==")
        drop_endpoint(manifest, "10.244.0.4")
        changed = time.monotonic()
        wait_for_sync(run_dir, agent, after=st.syncs)
        say(f"   programmed {1000 * (time.monotonic() - changed):.0f} ms after the file changed")
        say(f"   30 connections spread: {spread(client, 'http://10.96.0.10/', 30)}")
        mesh_demo(the_lab, client, xds=xds, work=work)
        say()
        say(ctlb("status", run_dir=run_dir, bpffs=bpffs))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        say("== cleaning up: ctlb uninstall, pods, namespaces, cgroups ==")
        say("   " + ctlb("uninstall", run_dir=run_dir, bpffs=bpffs).strip())


def main(argv: Sequence[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("the demo needs root: it makes network namespaces, cgroups and BPF programs", file=sys.stderr)
        return 1
    ctlb_lab.sweep()
    with tempfile.TemporaryDirectory(prefix="ctlb-demo-") as tmp, \
            tempfile.TemporaryDirectory(prefix="ctlb-demo-xds-") as xds_dir, ctlb_lab.Lab() as the_lab:
        os.chmod(xds_dir, 0o755)  # the sidecar (uid 1337) must reach the xDS socket
        demo(the_lab, pathlib.Path(tmp), pathlib.Path("/sys/fs/bpf") / f"{the_lab.prefix}-demo",
             pathlib.Path(xds_dir))
    say("== done ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
