"""The HZ the programs are compiled with is the rate the running kernel's jiffies advance at:
session affinity timeouts are counted in them."""

from __future__ import annotations

import pathlib
import re
import time

import pytest

from ctlb.datapath import kernelconf

TIMER_LIST = pathlib.Path("/proc/timer_list")


def _clock_and_jiffies() -> tuple[int, int]:
    """CLOCK_MONOTONIC ns and jiffies, as the kernel printed them together."""
    text = TIMER_LIST.read_text()
    now = re.search(r"^now at (\d+) nsecs$", text, re.MULTILINE)
    jiffies = re.search(r"^jiffies: (\d+)$", text, re.MULTILINE)
    assert now and jiffies, "unexpected /proc/timer_list format"
    return int(now.group(1)), int(jiffies.group(1))


@pytest.mark.skipif(not TIMER_LIST.exists(), reason="no /proc/timer_list to watch jiffies in")
def test_detected_hz_is_the_rate_jiffies_advance_at() -> None:
    hz = kernelconf.kernel_hz()
    if hz is None:
        pytest.skip("no kernel configuration to read: affinity keeps time with the coarse clock")
    ns0, j0 = _clock_and_jiffies()
    time.sleep(1.0)
    ns1, j1 = _clock_and_jiffies()
    measured = (j1 - j0) / ((ns1 - ns0) / 1e9)
    assert abs(measured - hz) <= 0.05 * hz, f"jiffies advance at {measured:.1f}/s, config says HZ={hz}"
