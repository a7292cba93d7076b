"""Where the xDS server listens: `unix:/path` for the node-local socket, `host:port` for TCP."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import stat
from dataclasses import dataclass

from meshredirect.xds import errors

UNIX_PREFIX = "unix:"
# sun_path holds 108 bytes, the terminating NUL included.
_MAX_UNIX_PATH = 107


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One parsed listen address: a Unix socket path, or a TCP host and port."""

    text: str
    path: pathlib.Path | None = None
    host: str = ""
    port: int = 0

    @property
    def grpc_target(self) -> str:
        """The address as grpcio's `add_insecure_port` takes it."""
        if self.path is not None:
            return f"{UNIX_PREFIX}{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse(text: str) -> ListenAddress:
    """Parses `unix:/abs/path` (also `unix:///abs/path`), `host:port` or `[v6]:port`.

    Raises:
        errors.XdsError: none of those forms, a relative or too long path, a bad port.
    """
    if text.startswith(UNIX_PREFIX):
        return _parse_unix(text)
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise errors.XdsError(f"xDS listen address {text!r}: expected unix:/path or host:port")
    return ListenAddress(text=text, host=host, port=int(port_text))


def _parse_unix(text: str) -> ListenAddress:
    raw = text.removeprefix(UNIX_PREFIX)
    if raw.startswith("///"):
        raw = raw[2:]
    path = pathlib.Path(raw)
    if not path.is_absolute():
        raise errors.XdsError(f"xDS listen address {text!r}: the socket path must be absolute")
    if len(os.fsencode(raw)) > _MAX_UNIX_PATH:
        raise errors.XdsError(f"xDS listen address {text!r}: path longer than {_MAX_UNIX_PATH} bytes")
    return ListenAddress(text=text, path=path)


def prepare_unix_socket(path: pathlib.Path) -> None:
    """Makes room for a Unix socket at `path`: creates its folder, removes a stale socket a
    crashed server left (nobody accepts on it), refuses to take over a live one.

    Raises:
        errors.XdsError: another server is listening there, or the path is not a socket.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.XdsError(f"xDS socket path {path} exists and is not a socket")
    if _accepting(path):
        raise errors.XdsError(f"xDS socket {path} is in use by another server")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _accepting(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True
