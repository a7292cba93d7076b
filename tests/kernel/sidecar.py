"""A stand-in sidecar for kernel tests of the mesh redirect, run in a lab pod as the proxy's uid.

It does what a proxy's outbound listener does with a redirected connection: asks the accepted
socket for its original destination (getsockopt SO_ORIGINAL_DST), connects there itself, and
answers the application with what it found, so a test sees every step from the client's side.
Envoy itself is exercised by the e2e tests; this one has no configuration to get wrong.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from ctlb import lab as ctlb_lab

SIDECAR_UID = 1337

_SIDECAR = textwrap.dedent("""
    import json, socket, struct, sys, threading, time
    port, delay = {port}, {delay}

    def original_dst(conn):
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]

    def upstream(dst):
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as up:
            up.settimeout(3)
            up.connect(tuple(dst))
            up.sendall(b"GET / HTTP/1.0\\r\\nHost: svc\\r\\n\\r\\n")
            data = b""
            while chunk := up.recv(65536):
                data += chunk
        return json.loads(data.split(b"\\r\\n\\r\\n", 1)[1])

    def handle(conn):
        with conn:
            conn.settimeout(3)
            try:
                conn.recv(65536)
                time.sleep(delay)
                answer = {{"via": "sidecar", "sidecar_peer": list(conn.getpeername()[:2])}}
                answer["original_dst"] = dst = original_dst(conn)
                answer.update(upstream(dst))
            except OSError as e:
                answer["sidecar_error"] = str(e)
            body = json.dumps(answer).encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))

    listeners = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        listeners.append(s)

    def serve(s):
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    for s in listeners[1:]:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("ready", flush=True)
    serve(listeners[0])
""")


def start(pod: ctlb_lab.Place, *, port: int = 15001, uid: int = SIDECAR_UID,
          delay: float = 0.0) -> subprocess.Popen[str]:
    """Starts the stand-in sidecar in `pod` as `uid`, listening on loopback; waits until it is.
    `delay` holds each accepted connection that long before asking its original destination."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            sys.executable, "-c", _SIDECAR.format(port=port, delay=delay)]
    proc = pod.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready" or time.monotonic() > deadline:
        pod.kill(proc)
        raise AssertionError(f"sidecar did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc
