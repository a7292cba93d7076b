"""What the verbs share: common options, the root check, and table rendering."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from ctlb import errors

DEFAULT_BPFFS = pathlib.Path("/sys/fs/bpf/ctlb")
DEFAULT_RUN_DIR = pathlib.Path("/run/ctlb")


def add_location_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bpffs", type=pathlib.Path, default=DEFAULT_BPFFS,
                        help=f"folder of ctlb's pins on a bpf file system (default {DEFAULT_BPFFS})")
    parser.add_argument("--run-dir", type=pathlib.Path, default=DEFAULT_RUN_DIR,
                        help=f"folder of the agent's state file (default {DEFAULT_RUN_DIR})")


def require_root(verb: str) -> None:
    if os.geteuid() != 0:
        raise errors.NotPrivileged(f"`ctlb {verb}` needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns, widths from the rows (IPv6 addresses included)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
