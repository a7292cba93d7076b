"""`ctlb socket-trace`: every decision of the socket programs, live, one line (or JSON object) each."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

from ctlb import trace
from ctlb.cli import common
from ctlb.datapath import maps

EPILOG = """examples:
  ctlb socket-trace                              # every decision on this node
  ctlb socket-trace --namespace shop             # connections made by pods of namespace shop
  ctlb socket-trace --pod shop/cart-7d9f --json  # one pod, JSON lines
  ctlb socket-trace --service kube-system/kube-dns --count 20

Each line: time, hook, protocol, the calling pod (or "node") and process, the address asked for
-> the address given (or the errno), the service port, and the decision with its reason.
Decisions: balanced, affinity, sticky (an unconnected send kept on its backend), refused,
dropped (no local endpoints), denied (loadBalancerSourceRanges), mesh (to the pod's sidecar),
reverse (recvmsg/getpeername shown the Service address). Addresses that are no Service are
never reported. One socket-trace runs at a time on a node.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("socket-trace", help="stream the socket programs' decisions", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_location_args(p)
    p.add_argument("--namespace", help="only connections made by pods of this namespace")
    p.add_argument("--pod", help="only connections made by this pod (NAME or NAMESPACE/NAME)")
    p.add_argument("--service", help="only decisions about this Service (NAMESPACE/NAME, any port)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("--count", type=_positive, default=None, help="stop after this many decisions")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _service_arg(text: str | None) -> str | None:
    if text is not None and text.count("/") != 1:
        raise argparse.ArgumentTypeError(f"--service takes NAMESPACE/NAME, not {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    common.require_root("socket-trace")
    wanted = trace.Filter(namespace=args.namespace, pod=args.pod, service=_service_arg(args.service))
    layouts = maps.compile_layouts()
    names = trace.Names(args.run_dir, args.bpffs, layouts)
    decoder = trace.Decoder(layouts[maps.TRACE_EVENT].leaf, names)
    stop = threading.Event()  # a signal, or --count reached
    shown = 0

    def on_record(record: bytes) -> None:
        nonlocal shown
        if args.count is not None and shown >= args.count:
            return
        decision = decoder.decode(record)
        if not wanted.admits(decision):
            return
        print(json.dumps(decision.as_json()) if args.json else decision.line(), flush=True)
        shown += 1
        if args.count is not None and shown >= args.count:
            stop.set()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    session = trace.Session(args.bpffs, layouts, on_record)
    try:
        print("tracing; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.is_set():
            session.poll(200)
        session.drain()  # what was decided before the signal is still shown
        lost = session.lost
    finally:
        session.close()
    if lost:
        print(f"ctlb socket-trace: {lost} decisions were not reported: the ring buffer was full",
              file=sys.stderr)
    return 0
