"""`ctlb uninstall`: detach every program and remove every pin."""

from __future__ import annotations

import argparse
import sys

from ctlb import statefile
from ctlb.cli import common
from ctlb.datapath import programs

EPILOG = """examples:
  ctlb uninstall                      # the default pin folder /sys/fs/bpf/ctlb
  ctlb uninstall --bpffs /sys/fs/bpf/ctlb-test
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="detach the programs and remove the pins", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_location_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.require_root("uninstall")
    agent = statefile.read(args.run_dir)
    if agent is not None and statefile.pid_alive(agent.pid):
        print(f"ctlb uninstall: warning: agent pid {agent.pid} is still running; stop it or it will "
              "keep writing maps no program reads", file=sys.stderr)
    removed = programs.uninstall(args.bpffs)
    statefile.remove(args.run_dir)
    print(f"removed {len(removed)} pins from {args.bpffs}" if removed else f"nothing installed in {args.bpffs}")
    return 0
