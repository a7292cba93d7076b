"""The sample sidecar bootstrap in deploy/ is one Envoy accepts, for both ways to reach the server."""

from __future__ import annotations

import json
import subprocess

import pytest

from ctlb.lab import envoy


def _validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(envoy.envoy_binary()), "--mode", "validate", "--disable-hot-restart", *args],
                          capture_output=True, text=True, timeout=60)


def test_sample_bootstrap_file_is_valid(require_envoy: None) -> None:
    done = _validate("-c", str(envoy.BOOTSTRAP))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("xds_address", ["unix:/run/ctlb/xds.sock", "10.0.0.5:15010", "[fd00::5]:15010"])
def test_sample_bootstrap_with_either_xds_address_is_valid(require_envoy: None, xds_address: str) -> None:
    config = envoy.bootstrap(node_id="sidecar~10.244.0.2~web-0.shop", cluster="shop", xds_address=xds_address)
    done = _validate("--config-yaml", json.dumps(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
