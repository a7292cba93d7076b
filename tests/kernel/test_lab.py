"""The lab itself, in the kernel: pods reach each other, processes land in pod netns and cgroups,
the backend servers report what they see, and teardown leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctlb import lab as ctlb_lab
from ctlb.lab import cgroups, netns, servers

pytestmark = pytest.mark.kernel

ECHO_PORT = 8080

# A bare socket client: no proxy settings can route it anywhere but the pod it names.
_HTTP_GET = """
import socket
with socket.create_connection(({host!r}, {port}), timeout=3) as s:
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: lab\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
print(data.split(b"\\r\\n\\r\\n", 1)[1].decode())
"""

_UDP_ASK = """
import json, socket
family = socket.AF_INET6 if ":" in {host!r} else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.sendto(b"hi", ({host!r}, {port}))
    data, source = s.recvfrom(4096)
print(json.dumps({{"answer": json.loads(data), "source": source[0], "source_port": source[1]}}))
"""


def _http_get(client: ctlb_lab.Place, address: object, port: int = ECHO_PORT) -> dict[str, Any]:
    done = client.python(_HTTP_GET.format(host=str(address), port=port), check=True)
    echo: dict[str, Any] = json.loads(done.stdout)
    return echo


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # Field 3, after the parenthesised command name, is the state; a zombie has finished.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid}: no cgroup v2 line")


def test_pods_reach_each_other_over_ipv4(lab: ctlb_lab.Lab) -> None:
    client, backend = lab.add_pod("client"), lab.add_pod("backend")
    servers.start_http(backend, name="backend", port=ECHO_PORT)

    echo = _http_get(client, backend.ipv4)

    assert echo == {
        "backend": "backend",
        "peer": str(client.ipv4),
        "peer_port": echo["peer_port"],
        "local": str(backend.ipv4),
    }


def test_pods_reach_each_other_over_ipv6(lab: ctlb_lab.Lab) -> None:
    client = lab.add_pod("client", ipv4=False, ipv6=True)
    backend = lab.add_pod("backend", ipv4=False, ipv6=True)
    servers.start_http(backend, name="backend", port=ECHO_PORT)

    echo = _http_get(client, backend.ipv6)

    assert (echo["peer"], echo["local"]) == (str(client.ipv6), str(backend.ipv6))


def test_node_processes_reach_pods_from_the_bridge_address(lab: ctlb_lab.Lab) -> None:
    backend = lab.add_pod("backend")
    servers.start_http(backend, name="backend", port=ECHO_PORT)

    echo = _http_get(lab.node, backend.ipv4)

    assert echo["peer"] == str(ctlb_lab.NODE_IPV4)


def test_pod_popen_runs_in_the_pod_leaf_cgroup(lab: ctlb_lab.Lab) -> None:
    pod = lab.add_pod("a")
    proc = pod.popen(["sleep", "30"])

    assert _cgroup_of(proc.pid) == cgroups.relative(pod.cgroup, mount=cgroups.mount_point())
    assert pod.cgroup.parent == pod.pod_cgroup
    assert pod.cgroup.is_relative_to(lab.cgroup_root)


def test_pod_popen_runs_in_the_pod_netns(lab: ctlb_lab.Lab) -> None:
    pod = lab.add_pod("a")
    proc = pod.popen(["sleep", "30"])

    ns_of_proc = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
    assert ns_of_proc == os.stat(netns.path(pod.netns)).st_ino
    assert ns_of_proc != os.stat("/proc/self/ns/net").st_ino


def test_node_popen_runs_in_node_netns_and_node_cgroup(lab: ctlb_lab.Lab) -> None:
    proc = lab.node.popen(["sleep", "30"])

    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(netns.path(lab.node.netns)).st_ino
    assert _cgroup_of(proc.pid) == cgroups.relative(lab.node.cgroup, mount=cgroups.mount_point())


_UID = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
_DASHED_UID = _UID.replace("_", "-")
_CID = r"[0-9a-f]{64}"


@pytest.mark.parametrize(
    ("driver", "qos", "pattern"),
    [
        pytest.param(
            "systemd", "besteffort",
            rf"kubepods\.slice/kubepods-besteffort\.slice/kubepods-besteffort-pod{_UID}\.slice"
            rf"/cri-containerd-{_CID}\.scope",
            id="systemd-besteffort",
        ),
        pytest.param(
            "systemd", "burstable",
            rf"kubepods\.slice/kubepods-burstable\.slice/kubepods-burstable-pod{_UID}\.slice"
            rf"/cri-containerd-{_CID}\.scope",
            id="systemd-burstable",
        ),
        pytest.param(
            "systemd", "guaranteed",
            rf"kubepods\.slice/kubepods-pod{_UID}\.slice/cri-containerd-{_CID}\.scope",
            id="systemd-guaranteed-directly-under-kubepods",
        ),
        pytest.param(
            "cgroupfs", "besteffort", rf"kubepods/besteffort/pod{_DASHED_UID}/{_CID}",
            id="cgroupfs-besteffort",
        ),
        pytest.param(
            "cgroupfs", "guaranteed", rf"kubepods/pod{_DASHED_UID}/{_CID}",
            id="cgroupfs-guaranteed-directly-under-kubepods",
        ),
    ],
)  # fmt: skip
def test_pod_cgroup_is_named_like_kubelet_names_it(
    lab: ctlb_lab.Lab, driver: str, qos: str, pattern: str
) -> None:
    pod = lab.add_pod("a", qos=qos, driver=driver)

    relative = pod.cgroup.relative_to(lab.cgroup_root).as_posix()
    assert re.fullmatch(pattern, relative)
    assert pod.cgroup.is_dir()
    uid_as_named = pod.uid.replace("-", "_") if driver == "systemd" else pod.uid
    assert uid_as_named in relative
    assert pod.container_id in pod.cgroup.name


def test_http_echo_reports_ipv4_client_of_dual_stack_server_as_plain_ipv4(
    lab: ctlb_lab.Lab,
) -> None:
    client = lab.add_pod("client", ipv6=True)
    backend = lab.add_pod("backend", ipv6=True)
    servers.start_http(backend, name="web-1", port=ECHO_PORT)

    done = client.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "3", f"http://{backend.ipv4}:{ECHO_PORT}/"],
        check=True,
    )

    echo = json.loads(done.stdout)
    assert (echo["backend"], echo["peer"]) == ("web-1", str(client.ipv4))
    assert ipaddress.ip_address(echo["peer"]).version == 4


def test_udp_echo_answers_from_the_address_asked_and_reports_client(lab: ctlb_lab.Lab) -> None:
    client, backend = lab.add_pod("client"), lab.add_pod("backend")
    servers.start_udp(backend, name="udp-1", port=5300)

    done = client.python(_UDP_ASK.format(host=str(backend.ipv4), port=5300), check=True)

    seen = json.loads(done.stdout)
    assert (seen["source"], seen["source_port"]) == (str(backend.ipv4), 5300)
    assert seen["answer"]["backend"] == "udp-1"
    assert seen["answer"]["peer"] == str(client.ipv4)


def test_dnsmasq_answers_whoami_txt_with_its_name(lab: ctlb_lab.Lab) -> None:
    client = lab.add_pod("client", ipv6=True)
    dns = lab.add_pod("dns", ipv6=True)
    servers.start_dnsmasq(dns, name="dns-1")

    def dig(*query: str) -> str:
        argv = ["dig", f"@{dns.ipv6}", *query, "+short", "+time=1", "+tries=1"]
        return client.run(argv, check=True).stdout.strip()

    assert dig(servers.DNS_WHOAMI, "TXT") == '"dns-1"'
    assert dig(f"x.{servers.DNS_SVC_DOMAIN}", "A") == str(dns.ipv4)


def test_server_that_cannot_start_raises_with_its_stderr(lab: ctlb_lab.Lab) -> None:
    pod = lab.add_pod("a")
    servers.start_http(pod, name="first", port=ECHO_PORT)

    with pytest.raises(ctlb_lab.LabError, match="Address already in use"):
        servers.start_http(pod, name="second", port=ECHO_PORT, bind="0.0.0.0")


def test_close_removes_every_netns_cgroup_and_process(require_root: None) -> None:
    lab = ctlb_lab.Lab()
    a, b = lab.add_pod("a", ipv6=True), lab.add_pod("b", driver="cgroupfs")
    pids = [
        servers.start_http(a, name="a", port=ECHO_PORT).pid,
        servers.start_udp(b, name="b", port=5300).pid,
        lab.node.popen(["sleep", "60"]).pid,
    ]
    # A daemon that left its session: only the cgroup still knows it.
    escaped = a.run(["sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!"], check=True)
    pids.append(int(escaped.stdout))
    assert ctlb_lab.leftovers(lab.prefix)

    lab.close()

    assert ctlb_lab.leftovers(lab.prefix) == []
    assert not lab.cgroup_root.exists()
    assert [pid for pid in pids if _running(pid)] == []


def test_close_after_add_pod_failed_half_way_removes_everything(
    require_root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(**_kwargs: object) -> str:
        raise ctlb_lab.LabError("injected: container cgroup")

    lab = ctlb_lab.Lab()
    lab.add_pod("a")
    # Fails after the pod's netns, veth and pod-level cgroups exist.
    monkeypatch.setattr(cgroups, "container_cgroup_name", fail)
    with pytest.raises(ctlb_lab.LabError, match="injected"):
        lab.add_pod("b")
    assert f"{lab.prefix}-b" in netns.names()

    lab.close()

    assert ctlb_lab.leftovers(lab.prefix) == []


def test_duplicate_pod_name_is_refused_and_lab_still_closes_clean(require_root: None) -> None:
    with ctlb_lab.Lab() as lab:
        lab.add_pod("a")
        with pytest.raises(ValueError, match="exists already"):
            lab.add_pod("a")

    assert ctlb_lab.leftovers(lab.prefix) == []


def test_lab_whose_setup_fails_half_way_leaves_nothing(
    require_root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(name: str, commands: object) -> None:
        raise ctlb_lab.LabError(f"injected: ip batch in {name}")

    prefix = ctlb_lab.new_prefix()
    # Fails after the cgroup root and the node netns exist.
    monkeypatch.setattr(netns, "ip_batch", fail)
    with pytest.raises(ctlb_lab.LabError, match="injected"):
        ctlb_lab.Lab(prefix=prefix)

    assert ctlb_lab.leftovers(prefix) == []


def test_sweep_removes_leftovers_of_dead_runs_and_spares_live_ones(require_root: None) -> None:
    dead_pid = subprocess.run(
        ["sh", "-c", "echo $$"], capture_output=True, text=True, check=True
    ).stdout
    dead = f"{ctlb_lab.FAMILY}{int(dead_pid)}x1"
    live = ctlb_lab.new_prefix()
    mount = cgroups.mount_point()
    (mount / dead / "kubepods").mkdir(parents=True)
    (mount / live).mkdir()
    try:
        netns.add(f"{dead}-node")
        netns.add(f"{live}-node")
        procs_file = mount / dead / "kubepods" / "cgroup.procs"
        stray = subprocess.Popen(["sh", "-c", f"echo $$ > {procs_file} && exec sleep 60"])
        _wait_for(lambda: _cgroup_of(stray.pid).endswith("/kubepods"))

        removed = ctlb_lab.sweep()

        assert sorted(removed) == sorted([str(mount / dead), f"{dead}-node"])
        assert ctlb_lab.leftovers(dead) == []
        assert stray.wait(timeout=5) == -9
        assert sorted(ctlb_lab.leftovers(live)) == sorted([f"{live}-node", str(mount / live)])
    finally:
        netns.delete(f"{live}-node")
        netns.delete(f"{dead}-node")
        cgroups.remove_tree(mount / live)
        cgroups.remove_tree(mount / dead)


def _wait_for(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
