"""The running kernel's configuration, as the programs' compile reads it."""

from __future__ import annotations

import gzip
import pathlib

from ctlb.datapath import kernelconf

CONFIG = b"# Automatically generated file; DO NOT EDIT.\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_SCHED_HRTICK=y\n"


def test_hz_is_read_from_a_config_text() -> None:
    assert kernelconf.hz_of_config(CONFIG) == 250


def test_a_config_without_hz_or_with_an_implausible_one_says_nothing() -> None:
    assert kernelconf.hz_of_config(b"CONFIG_HZ_250=y\n# CONFIG_HZ is not set\n") is None
    assert kernelconf.hz_of_config(b"CONFIG_HZ=0\n") is None
    assert kernelconf.hz_of_config(b"CONFIG_HZ=1000000\n") is None


def test_the_compressed_proc_config_is_read_first(tmp_path: pathlib.Path) -> None:
    proc = tmp_path / "config.gz"
    proc.write_bytes(gzip.compress(CONFIG.replace(b"=250", b"=1000")))
    boot = tmp_path / "config-6.18.0"
    boot.write_bytes(CONFIG)
    assert kernelconf.kernel_hz([proc, boot]) == 1000


def test_a_missing_or_broken_file_falls_through_to_the_next(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "config.gz"
    broken.write_bytes(b"not gzip at all")
    boot = tmp_path / "config-6.18.0"
    boot.write_bytes(CONFIG)
    assert kernelconf.kernel_hz([tmp_path / "absent.gz", broken, boot]) == 250


def test_no_configuration_anywhere_is_none(tmp_path: pathlib.Path) -> None:
    assert kernelconf.kernel_hz([tmp_path / "config.gz", tmp_path / "config-x"]) is None


def test_the_boot_config_is_named_after_the_release() -> None:
    assert kernelconf.config_paths("6.1.0-56-amd64")[-1] == pathlib.Path("/boot/config-6.1.0-56-amd64")
