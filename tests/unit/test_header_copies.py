"""The few constants Python must copy from C are checked against their source, so they cannot drift."""

from __future__ import annotations

import ipaddress
import re

import pytest

from ctlb.datapath import maps, programs, tables


def _header() -> str:
    return (maps.bpf_source_dir() / "ctlb.h").read_text()


def test_frontend_flags_match_enum_lb_flags_in_the_header() -> None:
    enum = re.search(r"enum lb_flags \{(.*?)\};", _header(), re.S)
    assert enum is not None
    values = {name: 1 << int(bit) for name, bit in re.findall(r"(LB_F_\w+)\s*=\s*1\s*<<\s*(\d+)", enum[1])}
    assert values == {name: getattr(tables, name) for name in values}
    assert set(values) == {name for name in vars(tables) if name.startswith("LB_F_")}


def test_flags_needing_the_egress_program_match_ctlb_needs_egress() -> None:
    found = re.search(r"^#define CTLB_NEEDS_EGRESS \((.*?)\)", _header(), re.M)
    assert found is not None
    names = [n.strip() for n in found[1].split("|")]
    mask = 0
    for name in names:
        mask |= getattr(tables, name)
    assert mask == tables.NEEDS_EGRESS


def test_drop_addresses_match_the_header() -> None:
    words = {name: int(value, 16) for name, value in
             re.findall(r"^#define CTLB_DROP_ADDR(\w*) (0x[0-9a-fA-F]+)U", _header(), re.M)}
    assert ipaddress.IPv4Address(words["4"]) == tables.DROP_ADDR4
    six = b"".join(words[f"6_{i}"].to_bytes(4, "big") for i in range(4))
    assert ipaddress.IPv6Address(six) == tables.DROP_ADDR6


def test_drop_addresses_are_outside_every_range_in_real_use() -> None:
    """192.0.0.8 is destination-invalid (RFC 7600/6890); 100::1 is in the discard-only /64."""
    assert tables.DROP_ADDR4 in ipaddress.ip_network("192.0.0.0/24")
    assert tables.DROP_ADDR4 not in ipaddress.ip_network("192.0.0.0/29")  # DS-Lite, 464XLAT
    assert tables.DROP_ADDR6 in ipaddress.ip_network("100::/64")


def test_pod_flags_and_range_kinds_match_the_header() -> None:
    from meshredirect import podmap

    flags = re.search(r"enum pod_flags \{(.*?)\};", _header(), re.S)
    kinds = re.search(r"enum mesh_range_kind \{(.*?)\};", _header(), re.S)
    assert flags is not None and kinds is not None
    c_flags = {name: 1 << int(bit) for name, bit in re.findall(r"(POD_F_\w+)\s*=\s*1\s*<<\s*(\d+)", flags[1])}
    assert c_flags == {name: getattr(podmap, name) for name in c_flags}
    assert set(c_flags) == {name for name in vars(podmap) if name.startswith("POD_F_")}
    c_kinds = {name: int(v) for name, v in re.findall(r"(MESH_RANGE_\w+)\s*=\s*(\d+)", kinds[1])}
    assert c_kinds == {"MESH_RANGE_INCLUDE": podmap.MESH_RANGE_INCLUDE, "MESH_RANGE_EXCLUDE": podmap.MESH_RANGE_EXCLUDE}


def test_slot_states_match_enum_lb_slot_state_in_the_header() -> None:
    enum = re.search(r"enum lb_slot_state \{(.*?)\};", _header(), re.S)
    assert enum is not None
    values = {name: int(v) for name, v in re.findall(r"LB_SLOT_(\w+)\s*=\s*(\d+)", enum[1])}
    assert values == {"EMPTY": tables.SLOT_EMPTY, "USED": tables.SLOT_USED, "TOMB": tables.SLOT_TOMB}


def test_probe_window_matches_ctlb_fe_probes_in_the_header() -> None:
    found = re.search(r"^#define CTLB_FE_PROBES (\d+)", _header(), re.M)
    assert found is not None and int(found[1]) == tables.FE_PROBES


def test_frontend_hash_matches_ctlb_mix64_in_sock_c() -> None:
    """Python places frontends where bpf/sock.c looks for them: same shifts, same multipliers."""
    import inspect

    source = (maps.bpf_source_dir() / "sock.c").read_text()
    body = re.search(r"__u64 ctlb_mix64\(__u64 x\)\s*\{(.*?)\}", source, re.S)
    assert body is not None
    c_steps = re.findall(r"x \^= x >> (\d+)|x \*= (0x[0-9a-fA-F]+)ULL", body[1])
    py_steps = re.findall(r"x \^= x >> (\d+)|x = \(x \* (0x[0-9a-fA-F]+)\)", inspect.getsource(tables.mix64))
    assert [(a, b.lower()) for a, b in c_steps] == [(a, b.lower()) for a, b in py_steps]
    assert len(c_steps) == 5


def test_ipv6_key_fold_matches_fe6_hash_in_sock_c() -> None:
    import inspect

    source = (maps.bpf_source_dir() / "sock.c").read_text()
    body = re.search(r"__u64 fe6_hash\(__u64 w0, __u64 w1, __u32 w2\)\s*\{\s*return (.*?);\s*\}", source, re.S)
    assert body is not None
    assert body[1] == "ctlb_mix64(w0 ^ ((w1 << 32) | (w1 >> 32)) ^ ((__u64)w2 << 16))"
    assert "mix64(w0 ^ (((w1 << 32) | (w1 >> 32)) & _U64) ^ (w2 << 16))" in inspect.getsource(tables.key_hash)


def test_every_map_the_header_declares_is_known_to_python() -> None:
    declared = set(re.findall(r"^CTLB_MAP\([^;]*?,\s*(ctlb_\w+),", _header(), re.M))
    assert declared == {*maps.ALL_MAPS, maps.TRACE_EVENT}
    pinned_ring = re.findall(r'section\("maps/ringbuf:" CTLB_PIN_DIR "/(ctlb_\w+)"\)', _header())
    assert pinned_ring == [maps.TRACE_RING]


def test_attach_types_match_the_kernel_uapi_numbers_bcc_carries() -> None:
    bcc = pytest.importorskip("bcc")
    kernel = bcc.BPFAttachType
    assert {h.program: h.attach_type for h in (*programs.HOOKS, *programs.POD_HOOKS)} == {
        "ctlb_connect4": kernel.CGROUP_INET4_CONNECT,
        "ctlb_sendmsg4": kernel.CGROUP_UDP4_SENDMSG,
        "ctlb_recvmsg4": kernel.CGROUP_UDP4_RECVMSG,
        "ctlb_getpeer4": kernel.CGROUP_INET4_GETPEERNAME,
        "ctlb_connect6": kernel.CGROUP_INET6_CONNECT,
        "ctlb_sendmsg6": kernel.CGROUP_UDP6_SENDMSG,
        "ctlb_recvmsg6": kernel.CGROUP_UDP6_RECVMSG,
        "ctlb_getpeer6": kernel.CGROUP_INET6_GETPEERNAME,
        "ctlb_sockops": kernel.CGROUP_SOCK_OPS,
        "ctlb_getsockopt": kernel.CGROUP_GETSOCKOPT,
        "ctlb_egress": kernel.CGROUP_INET_EGRESS,
        "ctlb_meshconn4": kernel.CGROUP_INET4_CONNECT,
        "ctlb_meshconn6": kernel.CGROUP_INET6_CONNECT,
    }


def test_program_types_match_the_kernel_uapi_numbers_bcc_carries() -> None:
    bcc = pytest.importorskip("bcc")
    assert programs.PROG_CGROUP_SOCK_ADDR == bcc.BPF.CGROUP_SOCK_ADDR
    assert programs.PROG_SOCK_OPS == bcc.BPF.SOCK_OPS
    # bcc 0.26 has no CGROUP_SOCKOPT: its neighbours in enum bpf_prog_type pin it down.
    assert bcc.BPF.LSM == 29 and programs.PROG_CGROUP_SOCKOPT == 25
    assert programs.PROG_CGROUP_SKB == bcc.BPF.CGROUP_SKB


def test_every_hook_names_an_entry_point_of_the_program_unit() -> None:
    source = programs.program_text(maps.bpf_source_dir()).decode()
    for hook in (*programs.HOOKS, *programs.POD_HOOKS):
        assert re.search(rf"^int {hook.program}\(struct \w+ \*\w+\)", source, re.M), hook.program
        assert len(hook.program) <= 15, "kernel object names hold 15 characters"


def test_trace_hooks_and_verdicts_match_the_header() -> None:
    from ctlb import trace

    hooks = re.search(r"enum trace_hook \{(.*?)\};", _header(), re.S)
    verdicts = re.search(r"enum trace_verdict \{(.*?)\};", _header(), re.S)
    assert hooks is not None and verdicts is not None
    assert {int(v): n.lower() for n, v in re.findall(r"TRACE_(\w+) = (\d+)", hooks[1])} == trace.HOOKS
    numbers = {n: int(v) for n, v in re.findall(r"TRACE_V_(\w+) = (\d+)", verdicts[1])}
    assert set(numbers.values()) == set(trace.VERDICTS)
    assert (numbers["MESH"], numbers["REVERSE"]) == (trace.VERDICT_MESH, trace.VERDICT_REVERSE)
    assert re.search(r"#define CTLB_AF_INET (\d+)", _header())[1] == str(trace.AF_INET)  # type: ignore[index]


@pytest.mark.parametrize(
    ("define", "ways", "size_field", "slots_field", "asked_sizes"),
    [
        ("CTLB_MESH_WAYS", programs.MESH_WAYS, "mesh_conns", "mesh_conn_slots", (1, 3, 4, 5, 65536, 65537)),
        ("CTLB_AFFINITY_WAYS", programs.AFFINITY_WAYS, "affinity", "affinity_slots", (1, 3, 4, 5, 131072, 131073)),
    ],
    ids=["mesh", "affinity"],
)
def test_set_ways_match_the_header_and_tables_hold_whole_sets(
    define: str, ways: int, size_field: str, slots_field: str, asked_sizes: tuple[int, ...]
) -> None:
    found = re.search(rf"^#define {define} (\d+)$", _header(), re.M)
    assert found is not None and int(found[1]) == ways
    for asked in asked_sizes:
        slots = getattr(programs.MapSizes(**{size_field: asked}), slots_field)
        assert slots >= max(asked, ways) and slots & (slots - 1) == 0
