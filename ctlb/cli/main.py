"""Entry point of the `ctlb` command: parses the verb and turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ctlb import errors
from ctlb.cli import agent, services, socket_trace, status, uninstall
from ctlb.datapath import libbpf


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlb", description="eBPF connect-time load balancer for Kubernetes")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in (agent, status, services, socket_trace, uninstall):
        verb.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (errors.CtlbError, libbpf.BpfError) as exc:
        print(f"ctlb {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
