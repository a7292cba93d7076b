"""Run the C load generator (`bench/loadgen.c`) in lab places: build it, start servers, run clients.

`build` compiles the program once per source version into a cache outside the repository. The
servers are started with `place.popen` and awaited until they print "ready"; the clients run with
`place.run` and their one JSON line comes back as a dict::

    with lab.Lab() as L:
        server, client = L.add_pod("server"), L.add_pod("client")
        loadgen.start_tcp_server(server, port=8080, cpu=1)
        print(loadgen.tcp_crr(client, host=server.ipv4, port=8080, seconds=5, cpu=0))

A client's result carries "errors", "first_errno", "seconds", "rate" and the latency figures
"p50_us", "p90_us", "p99_us", "mean_us", "min_us", "max_us"; the operation count is
"connections" (tcp-crr) or "transactions" (tcp-rr, udp-rr).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pathlib
import selectors
import shutil
import subprocess
import tempfile
from typing import Any

from ctlb import lab
from ctlb.lab import netns

SOURCE = pathlib.Path(__file__).with_name("loadgen.c")
DEFAULT_CACHE_DIR = pathlib.Path("/tmp/ctlb-bench-build")
CFLAGS = ("-O2", "-Wall", "-Wextra")

# Per-netns settings for a client that opens tens of thousands of connections a second.
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.tcp_tw_reuse": "1",
}

_READY_TIMEOUT_S = 5.0
# A client exits on its own within --seconds plus its 1 s I/O timeout; more means it is stuck.
_CLIENT_GRACE_S = 10.0
_STOP_TIMEOUT_S = 5.0

Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address
Result = dict[str, Any]

# The network namespaces `tune` has set up in this process, by (name, nsfs inode): the inode
# tells a namespace apart from a later one of the same name. The module's only mutable state.
_tuned: set[tuple[str, int]] = set()


class LoadgenError(RuntimeError):
    """The load generator could not be built, did not start, or failed to run."""


def build(*, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Compile `loadgen.c` unless a binary of this very source is cached already.

    The binary's name carries a hash of the source and flags, so an edited source is rebuilt and
    concurrent builds of one version agree (each writes a temporary file, then renames it).

    Args:
        cache_dir: where binaries live; default `/tmp/ctlb-bench-build`, outside the repository.

    Returns:
        The path of the executable.

    Raises:
        LoadgenError: gcc is missing or fails (its stderr is in the message).
    """
    cache = cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = cache / f"loadgen-{digest}"
    if os.access(binary, os.X_OK):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    _compile(binary, cache=cache)
    return binary


def tune(place: lab.Place) -> None:
    """Set the client sysctls (`CLIENT_SYSCTLS`) in place's network namespace.

    Only that namespace is touched, never the host's. The clients below call this themselves,
    once per namespace; it is safe to call again.

    Raises:
        lab.LabError: sysctl failed.
    """
    netns.sysctl(place.netns, CLIENT_SYSCTLS)
    _tuned.add(_netns_key(place))


def start_tcp_server(
    place: lab.Place, *, port: int, echo: bool = False, cpu: int | None = None
) -> subprocess.Popen[str]:
    """Start `loadgen serve-tcp` in place and wait until it listens on [::]:port (and IPv4).

    Args:
        place: pod or node to run in.
        port: TCP port.
        echo: echo bytes back (for `tcp_rr`); otherwise each connection is closed
            (FIN) as soon as it is accepted (for `tcp_crr`).
        cpu: pin the server to this CPU.

    Returns:
        The server process; stop it with `stop` (for its counters) or `place.kill`.

    Raises:
        LoadgenError: it exited or did not report ready in time.
    """
    extra = ["--echo"] if echo else []
    return _start_server(place, ["serve-tcp", "--port", str(port), *extra], cpu=cpu)


def start_udp_server(
    place: lab.Place, *, port: int, cpu: int | None = None
) -> subprocess.Popen[str]:
    """Start the `loadgen serve-udp` echo server in place and wait until it is bound.

    Args:
        place: pod or node to run in.
        port: UDP port.
        cpu: pin the server to this CPU.

    Returns:
        The server process; stop it with `stop` (for its counters) or `place.kill`.

    Raises:
        LoadgenError: it exited or did not report ready in time.
    """
    return _start_server(place, ["serve-udp", "--port", str(port)], cpu=cpu)


def stop(proc: subprocess.Popen[str]) -> Result:
    """Stop a server with SIGTERM and return its counters ("accepted" or "echoed", errors).

    Call it instead of `place.kill`, which closes the pipes the counters come through.

    Raises:
        LoadgenError: it did not exit in time, failed, or printed no result.
    """
    if proc.poll() is None:
        proc.terminate()
    try:
        out, err = proc.communicate(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise LoadgenError(f"loadgen server pid {proc.pid} ignored SIGTERM") from exc
    lines = [line for line in out.splitlines() if line.strip() and line.strip() != "ready"]
    return _parse_result(lines[-1] if lines else "", stderr=err, what="server")


def tcp_crr(
    place: lab.Place,
    *,
    host: Host,
    port: int,
    seconds: float,
    cpu: int | None = None,
    max_connections: int | None = None,
) -> Result:
    """Open and abort TCP connections back to back; report the rate and connect() latency.

    Args:
        place: where the client runs (tuned with `tune` on first use).
        host: IPv4 or IPv6 address to connect to (a Service address or a pod's).
        port: TCP port.
        seconds: how long to run.
        cpu: pin the client to this CPU.
        max_connections: stop early after this many connections.

    Returns:
        The client's result; "connections" counts successful connects.

    Raises:
        LoadgenError: the client failed to run (not: connections failed; see "errors").
    """
    extra = ["--max", str(max_connections)] if max_connections is not None else []
    return _run_client(place, "tcp-crr", host=host, port=port, seconds=seconds, cpu=cpu,
                       extra=extra)  # fmt: skip


def tcp_rr(
    place: lab.Place, *, host: Host, port: int, seconds: float, cpu: int | None = None
) -> Result:
    """Ping-pong one byte each way over one TCP connection to a `start_tcp_server(echo=True)`.

    Args:
        place: where the client runs.
        host: IPv4 or IPv6 address.
        port: TCP port.
        seconds: how long to run.
        cpu: pin the client to this CPU.

    Returns:
        The client's result; "transactions" counts round trips.

    Raises:
        LoadgenError: the client failed to run.
    """
    return _run_client(place, "tcp-rr", host=host, port=port, seconds=seconds, cpu=cpu)


def udp_rr(
    place: lab.Place,
    *,
    host: Host,
    port: int,
    seconds: float,
    cpu: int | None = None,
    connected: bool = True,
) -> Result:
    """Send 64-byte UDP requests to a `start_udp_server` and wait for each echo (1 s timeout).

    Args:
        place: where the client runs.
        host: IPv4 or IPv6 address.
        port: UDP port.
        seconds: how long to run.
        cpu: pin the client to this CPU.
        connected: connect() the socket and use send/recv; otherwise sendto/recvfrom.

    Returns:
        The client's result; "transactions" counts answered requests, and "source_mismatch"
        counts replies (unconnected only) whose source is not the address sent to.

    Raises:
        LoadgenError: the client failed to run.
    """
    extra = [] if connected else ["--unconnected"]
    return _run_client(place, "udp-rr", host=host, port=port, seconds=seconds, cpu=cpu,
                       extra=extra)  # fmt: skip


def _compile(binary: pathlib.Path, *, cache: pathlib.Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LoadgenError("gcc not found on PATH: needed to build bench/loadgen.c")
    fd, tmp_name = tempfile.mkstemp(prefix=".loadgen-", dir=cache)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        done = subprocess.run(
            [gcc, *CFLAGS, "-o", str(tmp), str(SOURCE)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise LoadgenError(f"gcc failed on {SOURCE} (exit {done.returncode}):\n{done.stderr}")
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    finally:
        tmp.unlink(missing_ok=True)


def _netns_key(place: lab.Place) -> tuple[str, int]:
    return place.netns, os.stat(netns.path(place.netns)).st_ino


def _tune_once(place: lab.Place) -> None:
    if _netns_key(place) not in _tuned:
        tune(place)


def _command(subcommand: str, args: list[str], *, cpu: int | None) -> list[str]:
    pin = ["--cpu", str(cpu)] if cpu is not None else []
    return [str(build()), subcommand, *args, *pin]


def _start_server(place: lab.Place, args: list[str], *, cpu: int | None) -> subprocess.Popen[str]:
    argv = _command(args[0], args[1:], cpu=cpu)
    proc = place.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _await_ready(proc)
    except LoadgenError as exc:
        # An exited server explains itself on stderr; a hung one is killed before it is read.
        if proc.poll() is None:
            place.kill(proc)
            why = f"no 'ready' within {_READY_TIMEOUT_S} s"
        else:
            assert proc.stderr is not None
            why = f"exit {proc.returncode}: {proc.stderr.read().strip()}"
            place.kill(proc)
        raise LoadgenError(f"{' '.join(args)} in {place.netns}: {why}") from exc
    return proc


def _await_ready(proc: subprocess.Popen[str]) -> None:
    """Read the server's first line; it must be "ready", within `_READY_TIMEOUT_S`."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        # The server writes "ready\n" in one write, so a readable pipe holds the whole line
        # (or is at EOF because the server exited).
        if not sel.select(timeout=_READY_TIMEOUT_S):
            raise LoadgenError("timed out")
    if proc.stdout.readline().strip() != "ready":
        raise LoadgenError("exited")


def _run_client(
    place: lab.Place,
    subcommand: str,
    *,
    host: Host,
    port: int,
    seconds: float,
    cpu: int | None,
    extra: list[str] | None = None,
) -> Result:
    _tune_once(place)
    args = ["--host", str(host), "--port", str(port), "--seconds", str(seconds), *(extra or [])]
    argv = _command(subcommand, args, cpu=cpu)
    try:
        done = place.run(argv, timeout=seconds + _CLIENT_GRACE_S)
    except subprocess.TimeoutExpired as exc:
        raise LoadgenError(
            f"{subcommand} in {place.netns}: still running after {exc.timeout} s"
        ) from exc
    if done.returncode != 0:
        raise LoadgenError(
            f"{subcommand} in {place.netns}: exit {done.returncode}: {done.stderr.strip()}"
        )
    return _parse_result(done.stdout.strip(), stderr=done.stderr, what=subcommand)


def _parse_result(line: str, *, stderr: str, what: str) -> Result:
    try:
        result = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoadgenError(f"{what}: no JSON result in {line!r}; stderr: {stderr.strip()}") from exc
    if not isinstance(result, dict):
        raise LoadgenError(f"{what}: result is not an object: {line!r}")
    return result
