"""Fixtures shared by every test suite: the root/CI gate, a fresh lab, and the leftover sweep."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import pytest

from ctlb import lab as ctlb_lab


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _skip_or_fail(reason: str) -> None:
    # Under CI a missing privilege, tool or hook is a failure: a skipped kernel test proves nothing.
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _sweep_lab_leftovers() -> None:
    """Remove netns and cgroups left by crashed earlier runs (never those of live runs)."""
    if os.geteuid() != 0:
        return
    try:
        ctlb_lab.sweep()
    except ctlb_lab.LabError as exc:
        warnings.warn(f"lab leftovers not swept: {exc}", stacklevel=1)


@pytest.fixture
def unavailable() -> Callable[[str], None]:
    """Return a function that skips the test with a reason, or fails it under CI=true."""
    return _skip_or_fail


@pytest.fixture
def require_root() -> None:
    """Skip unless root (fail under CI=true): netns, cgroups and BPF need it."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root: creates network namespaces and cgroups")


@pytest.fixture
def lab(require_root: None) -> Iterator[ctlb_lab.Lab]:
    """A fresh fake node, removed with everything in it after the test."""
    with ctlb_lab.Lab() as the_lab:
        yield the_lab
