"""What the running kernel was built with, where the programs need it and cannot ask.

The programs are compiled on the node against whatever kernel headers are installed, which need
not be the running kernel's (Debian's 6.1 headers on a 6.18 kernel, here): a CONFIG_ value must
come from the running kernel's own configuration, `/proc/config.gz` or `/boot/config-<release>`.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
from collections.abc import Sequence

import structlog

log = structlog.get_logger()

_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d+)$", re.MULTILINE)
# Kconfig offers 100 to 1000 on x86 and values from 24 to 1200 elsewhere; outside a generous
# bound a config file is not trusted.
_HZ_BOUNDS = (10, 10_000)


def config_paths(release: str | None = None) -> tuple[pathlib.Path, ...]:
    """Where the running kernel's configuration may be read, most reliable first."""
    release = release or os.uname().release
    return (pathlib.Path("/proc/config.gz"), pathlib.Path(f"/boot/config-{release}"))


def kernel_hz(paths: Sequence[pathlib.Path] | None = None) -> int | None:
    """The running kernel's CONFIG_HZ (jiffies a second), or None when no configuration says."""
    paths = tuple(paths) if paths is not None else config_paths()
    for path in paths:
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw) if path.suffix == ".gz" else raw
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        hz = hz_of_config(text)
        if hz is not None:
            return hz
    log.info("kernel_hz_unknown", looked_in=[str(p) for p in paths],
             effect="session affinity reads the coarse clock, one helper call more a connect")
    return None


def hz_of_config(text: bytes) -> int | None:
    """CONFIG_HZ of a kernel configuration's text, when it holds a plausible one."""
    match = _CONFIG_HZ.search(text)
    if match is None:
        return None
    hz = int(match.group(1))
    return hz if _HZ_BOUNDS[0] <= hz <= _HZ_BOUNDS[1] else None
