"""Kernel-test fixtures: the real `ctlb` agent process on a lab's cgroup, fed manifest files."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import yaml

from ctlb import lab as ctlb_lab, statefile

BPFFS_ROOT = pathlib.Path("/sys/fs/bpf")
NODE_NAME = "lab-node"


def ctlb_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctlb.cli.main", *args]


class Cluster:
    """One lab plus one ctlb agent: write objects, wait for the datapath, run the CLI."""

    def __init__(self, the_lab: ctlb_lab.Lab, tmp: pathlib.Path) -> None:
        self.lab = the_lab
        self.bpffs = BPFFS_ROOT / the_lab.prefix
        self.run_dir = tmp / "run"
        self.manifests = tmp / "manifests"
        self.manifests.mkdir()
        self.log_path = tmp / "agent.log"
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_args: list[str] = []

    # --- manifests ------------------------------------------------------------------------

    def write(self, name: str, objects: Sequence[dict[str, Any]]) -> None:
        """Writes a multi-document YAML file atomically, so the agent never reads half of it."""
        tmp = self.manifests / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        os.replace(tmp, self.manifests / f"{name}.yaml")

    def write_text(self, name: str, text: str) -> None:
        tmp = self.manifests / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.manifests / f"{name}.yaml")

    # --- the agent ------------------------------------------------------------------------

    def start_agent(self, *extra: str, kubeconfig: pathlib.Path | None = None, wait: bool = True) -> None:
        """Starts the agent on the manifests folder, or on the API server of `kubeconfig`.

        Without a `--healthz-bind-address` in `extra`, the agent serves no /healthz: the node's
        10256 is shared by every test and agent running on this machine.
        """
        source = ["--kubeconfig", str(kubeconfig)] if kubeconfig is not None else ["--manifests", str(self.manifests)]
        if "--healthz-bind-address" not in extra:
            extra = (*extra, "--healthz-bind-address", "none")
        self.agent_args = ["agent", *source, "--node-name", NODE_NAME,
                           "--cgroup", str(self.lab.cgroup_root), "--bpffs", str(self.bpffs),
                           "--run-dir", str(self.run_dir), "--log-json", *extra]
        log = self.log_path.open("ab")
        self.agent = subprocess.Popen(ctlb_command(*self.agent_args), stdout=log, stderr=log)
        if wait:
            self.wait_synced()

    def kill_agent(self, sig: int = signal.SIGKILL) -> int:
        assert self.agent is not None
        self.agent.send_signal(sig)
        code = self.agent.wait(timeout=10)
        self.agent = None
        return code

    def wait_synced(self, *, after: int = 0, timeout: float = 20.0) -> statefile.AgentState:
        """Waits until the running agent has synced more than `after` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"agent exited with {self.agent.returncode}:\n{self.log()}")
            st = statefile.read(self.run_dir)
            if st is not None and self.agent is not None and st.pid == self.agent.pid and st.syncs > after:
                return st
            time.sleep(0.05)
        raise AssertionError(f"agent did not sync within {timeout}s:\n{self.log()}")

    def wait_pods(self, count: int) -> None:
        """Waits until the agent has found `count` pods' cgroups (it looks every 0.2 s)."""
        for _ in range(100):
            if (self.state().mesh or {}).get("pods", 0) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"the agent did not find {count} pods: {self.state().mesh}")

    def state(self) -> statefile.AgentState:
        st = statefile.read(self.run_dir)
        assert st is not None
        return st

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def ctlb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(ctlb_command(*args, "--bpffs", str(self.bpffs), "--run-dir", str(self.run_dir)),
                             capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"ctlb {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.kill_agent(signal.SIGTERM)
        subprocess.run(ctlb_command("uninstall", "--bpffs", str(self.bpffs), "--run-dir", str(self.run_dir)),
                       capture_output=True, timeout=60)


@pytest.fixture
def require_bcc(unavailable) -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        unavailable("needs Debian's python3-bpfcc (the bcc module)")


@pytest.fixture
def cluster(lab: ctlb_lab.Lab, require_bcc: None, tmp_path: pathlib.Path) -> Iterator[Cluster]:
    c = Cluster(lab, tmp_path)
    try:
        yield c
    finally:
        c.close()
