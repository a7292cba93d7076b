"""Run the xDS server alone, on manifest files: for demos and tests without the agent.

    python -m meshredirect.xds --manifests deploy/example/ --listen unix:/run/ctlb/xds.sock

It reads the manifests as `ctlb agent --manifests` does (same store and planner), serves them to
sidecars, and publishes again whenever the files change. No BPF, no root needed beyond the socket.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import structlog

from ctlb import logs, model, planner
from ctlb.sources import manifests, store
from meshredirect.xds import errors, resources, server

log = structlog.get_logger()

EPILOG = """examples:
  python -m meshredirect.xds --manifests svc.yaml --listen unix:/run/ctlb/xds.sock
  python -m meshredirect.xds --manifests objects/ --listen 127.0.0.1:15010 --access-log
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshredirect.xds", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", type=pathlib.Path, action="append", required=True,
                        help="file or folder of Kubernetes YAML (repeatable); reloaded on change")
    parser.add_argument("--listen", action="append", required=True,
                        help="unix:/path or host:port (repeatable)")
    parser.add_argument("--node-name", default=socket.gethostname(), help="this node's name (default: host name)")
    parser.add_argument("--outbound-port", type=int, default=resources.DEFAULT_OUTBOUND_PORT,
                        help="the sidecars' outbound listener port (default 15001)")
    parser.add_argument("--access-log", action="store_true", help="sidecars log each connection as JSON on stdout")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between looks at the files")
    parser.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                        help="JSON log lines (default: when stderr is not a terminal)")
    args = parser.parse_args(argv)
    logs.configure(json=args.log_json)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    options = resources.Options(outbound_port=args.outbound_port, access_log=args.access_log)
    try:
        xds = server.XdsServer(args.listen, options=options)
        xds.start()
    except errors.XdsError as exc:
        print(f"xds: {exc}", file=sys.stderr)
        return 1
    try:
        _serve(xds, args.manifests, node_name=args.node_name, interval=args.interval, stop=stop)
    finally:
        xds.stop()
    return 0


def _serve(xds: server.XdsServer, paths: Sequence[pathlib.Path], *, node_name: str, interval: float,
           stop: threading.Event) -> None:
    """Publishes the manifests' objects, then again after each change, until `stop`."""
    objects = store.ObjectStore()
    plan = planner.Planner(node_name)
    reader = manifests.ManifestReader(paths)
    watcher = manifests.ManifestWatcher(paths, interval=interval)
    first = True
    reported: set[model.Problem] = set()
    try:
        while not stop.is_set():
            if watcher.changed():
                reader.refresh(objects)
                changes = objects.take()
                if first or changes is not None:
                    plan.update(objects, None if first else changes)
                    services = [s for s in objects.objects("Service") if isinstance(s, model.Service)]
                    published = xds.publish(plan.state().service_ports, services)
                    problems = {*objects.problems(), *plan.state().problems, *published.problems}
                    for problem in sorted(problems - reported):
                        log.error("object_not_served", object=problem.ref, reason=problem.reason)
                    reported = problems
                    first = False
            watcher.wait(interval)
    finally:
        watcher.close()


if __name__ == "__main__":
    sys.exit(main())
