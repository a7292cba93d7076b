"""`ctlb agent`: the node agent, in the foreground."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import threading

from ctlb import agent, datapath, healthcheck, logs
from ctlb.cli import common
from ctlb.datapath import cgroup
from meshredirect import switch

EPILOG = """examples:
  ctlb agent                                      # in a pod: watch the API server (in-cluster config)
  ctlb agent --kubeconfig ~/.kube/config          # watch the API server of a kubeconfig
  ctlb agent --manifests deploy/example/          # serve manifest files, reload on change
  ctlb agent --manifests svc.yaml --cgroup /sys/fs/cgroup/kubepods.slice
  ctlb agent --healthz-bind-address 127.0.0.1:10256   # /healthz and /livez on loopback only
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node agent (foreground)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifests", type=pathlib.Path, action="append", default=[],
                   help="file or folder of Kubernetes YAML to serve (repeatable); reloaded on change. "
                        "Without it, the agent watches the API server")
    p.add_argument("--kubeconfig", type=pathlib.Path,
                   help="watch the API server of this kubeconfig (default without --manifests: in-cluster config)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME, then the host name)")
    p.add_argument("--cgroup", type=pathlib.Path,
                   help="cgroup v2 folder the socket programs attach to (default: the cgroup2 root)")
    common.add_location_args(p)
    sizes = datapath.MapSizes()
    p.add_argument("--max-frontends", type=int, default=sizes.frontends, help="entries per frontend map")
    p.add_argument("--max-backends", type=int, default=sizes.backends, help="entries per backend map")
    p.add_argument("--max-revnat", type=int, default=sizes.revnat, help="entries per socket reverse-NAT map")
    p.add_argument("--max-affinity", type=int, default=sizes.affinity,
                   help="slots per session-affinity table (clients times Services with affinity; rounded up to a power of two)")
    p.add_argument("--max-mesh-conns", type=int, default=sizes.mesh_conns,
                   help="slots per original-destination table (meshed pods' connections the sidecar has not "
                        "asked about yet; rounded up to a power of two)")
    mesh = switch.MeshSettings()
    p.add_argument("--mesh-label", type=_label, action="append", default=None, metavar="KEY=VALUE",
                   help="a namespace label that puts its pods in the mesh (repeatable; default: "
                        + ", ".join(str(label) for label in mesh.namespace_labels) + ")")
    p.add_argument("--mesh-opt-out", default=mesh.opt_out_key, metavar="KEY",
                   help=f'a pod annotation or label that, set to "false", keeps it out of the mesh (default {mesh.opt_out_key})')
    p.add_argument("--sidecar-uid", type=int, default=mesh.sidecar_uid,
                   help=f"uid of the sidecar proxy, whose connections are never redirected (default {mesh.sidecar_uid})")
    p.add_argument("--sidecar-port", type=_port, default=mesh.outbound_port,
                   help=f"the sidecar's outbound port on loopback (default {mesh.outbound_port})")
    p.add_argument("--xds-listen", action="append", default=None, metavar="ADDR",
                   help="where the sidecars' xDS server listens: unix:/path or host:port (repeatable; "
                        "default unix:<run dir>/xds.sock; 'none' for no xDS server)")
    p.add_argument("--healthz-bind-address", type=_bind_address, default=healthcheck.DEFAULT_HEALTHZ_ADDRESS,
                   metavar="ADDR",
                   help="IP:PORT where kube-proxy's /healthz and /livez are served; 0.0.0.0 or :: is every "
                        f"address of both families ('' or 'none' to turn it off; default {healthcheck.DEFAULT_HEALTHZ_ADDRESS})")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="JSON log lines (default: when stderr is not a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.configure(json=args.log_json)
    common.require_root("agent")
    config = agent.AgentConfig(
        manifests=tuple(args.manifests),
        kubeconfig=args.kubeconfig,
        node_name=args.node_name,
        cgroup=args.cgroup or cgroup.cgroup2_mount(),
        bpffs=args.bpffs,
        run_dir=args.run_dir,
        sizes=datapath.MapSizes(frontends=args.max_frontends, backends=args.max_backends,
                                revnat=args.max_revnat, affinity=args.max_affinity,
                                mesh_conns=args.max_mesh_conns),
        xds_listen=_xds_listen(args.xds_listen, run_dir=args.run_dir),
        healthz_address=args.healthz_bind_address,
        mesh=switch.MeshSettings(
            namespace_labels=tuple(args.mesh_label) if args.mesh_label else switch.MeshSettings().namespace_labels,
            opt_out_key=args.mesh_opt_out, sidecar_uid=args.sidecar_uid, outbound_port=args.sidecar_port),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(config, stop=stop)
    return 0


def _label(text: str) -> switch.Label:
    try:
        return switch.Label.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _bind_address(text: str) -> healthcheck.BindAddress | None:
    try:
        return healthcheck.BindAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _xds_listen(given: list[str] | None, *, run_dir: pathlib.Path) -> tuple[str, ...]:
    if given is None:
        return (f"unix:{run_dir / 'xds.sock'}",)
    return tuple(a for a in given if a != "none")
