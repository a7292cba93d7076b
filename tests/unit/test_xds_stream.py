"""The ADS protocol rules of one stream: what goes out, in which order, and what a NACK does."""

from __future__ import annotations

import ipaddress

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from structlog.testing import capture_logs

from ctlb import model, planner
from meshredirect.xds import resources, snapshot, stream

CDS, EDS, LDS, RDS = (snapshot.TypeUrl.CLUSTER, snapshot.TypeUrl.ENDPOINT, snapshot.TypeUrl.LISTENER,
                      snapshot.TypeUrl.ROUTE)
WEB4, WEB6 = "outbound|80|v4|web.shop", "outbound|80|v6|web.shop"


def _snapshot(*backends: str, serial: int = 1, port: int = 80) -> snapshot.Snapshot:
    """A dual-stack HTTP Service with IPv4 backends."""
    service = model.Service(namespace="shop", name="web", type=model.ServiceType.CLUSTER_IP,
                            ports=(model.ServicePort("http", model.Protocol.TCP, port, 8080),),
                            cluster_ips=(ipaddress.ip_address("10.96.0.10"), ipaddress.ip_address("fd00:96::a")),
                            ip_families=(model.IPFamily.IPv4, model.IPFamily.IPv6))
    endpoints = tuple(model.Endpoint(addresses=(ipaddress.ip_address(b),), ready=True) for b in backends)
    slices = [model.EndpointSlice(namespace="shop", name="web-1", service_name="web", address_type="IPv4",
                                  endpoints=endpoints,
                                  ports=(model.EndpointPort("http", model.Protocol.TCP, 8080),))] if backends else []
    state = planner.desired_state(services=[service], endpoint_slices=slices, node=None)
    return snapshot.from_resources(resources.build(state.service_ports, [service]), serial=serial)


def _request(type_url: snapshot.TypeUrl, *names: str, nonce: str = "", version: str = "",
             error: str | None = None) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url.value, resource_names=names, response_nonce=nonce,
                                             version_info=version)
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def _types(responses: list[discovery_pb2.DiscoveryResponse]) -> list[str]:
    return [snapshot.TypeUrl(r.type_url).short for r in responses]


def _ack(ads: stream.AdsStream, response: discovery_pb2.DiscoveryResponse, current: snapshot.Snapshot,
         *names: str) -> list[discovery_pb2.DiscoveryResponse]:
    return ads.on_request(_request(snapshot.TypeUrl(response.type_url), *names, nonce=response.nonce,
                                   version=response.version_info), current)


def _subscribed(current: snapshot.Snapshot) -> stream.AdsStream:
    """A stream that subscribed to all four types and acknowledged what it got."""
    ads = stream.AdsStream(peer="test")
    (cds,) = ads.on_request(_request(CDS), current)
    assert _ack(ads, cds, current) == []
    (eds,) = ads.on_request(_request(EDS, WEB4, WEB6), current)
    assert _ack(ads, eds, current, WEB4, WEB6) == []
    (lds,) = ads.on_request(_request(LDS), current)
    assert _ack(ads, lds, current) == []
    (rds,) = ads.on_request(_request(RDS, WEB4, WEB6), current)
    assert _ack(ads, rds, current, WEB4, WEB6) == []
    return ads


def test_nothing_is_sent_before_the_first_snapshot() -> None:
    ads = stream.AdsStream(peer="test")
    assert ads.on_request(_request(CDS), None) == []
    (cds,) = ads.due(_snapshot("10.244.0.5"))
    assert cds.type_url == CDS.value


def test_wildcard_request_gets_every_cluster() -> None:
    current = _snapshot("10.244.0.5")
    (cds,) = stream.AdsStream(peer="test").on_request(_request(CDS), current)
    assert cds.version_info == current.version(CDS)
    assert len(cds.resources) == 4  # two families, passthrough, black hole


def test_named_request_gets_only_the_names_it_asked_for() -> None:
    current = _snapshot("10.244.0.5")
    (eds,) = stream.AdsStream(peer="test").on_request(_request(EDS, WEB6), current)
    assert len(eds.resources) == 1


def test_new_snapshot_goes_out_cds_eds_lds_rds() -> None:
    ads = _subscribed(_snapshot("10.244.0.5"))
    assert _types(ads.due(_snapshot("10.244.0.5", port=81))) == ["CDS", "EDS", "LDS", "RDS"]


def test_endpoint_change_sends_only_endpoints() -> None:
    ads = _subscribed(_snapshot("10.244.0.5"))
    assert _types(ads.due(_snapshot("10.244.0.6"))) == ["EDS"]


def test_cluster_change_is_followed_by_endpoints_even_when_they_did_not_change() -> None:
    # A replaced cluster warms until its endpoints arrive: never send CDS without EDS after it.
    before = _snapshot("10.244.0.5")
    ads = _subscribed(before)
    after = snapshot.Snapshot(serial=2, types={**before.types, CDS: snapshot.TypeSnapshot(
        version="changed", resources=before.types[CDS].resources)})
    responses = ads.due(after)
    assert _types(responses) == ["CDS", "EDS"]
    assert responses[1].version_info == before.version(EDS)


def test_new_clusters_get_their_endpoints_before_the_listener_that_leads_to_them() -> None:
    before = _snapshot("10.244.0.5")
    ads = _subscribed(before)
    after = _snapshot("10.244.0.5", port=81)  # the port is in the cluster names: new clusters
    cds, eds, lds, rds = ads.due(after)
    assert {r.type_url for r in (cds, eds, lds, rds)} == {CDS.value, EDS.value, LDS.value, RDS.value}
    new = {"outbound|81|v4|web.shop", "outbound|81|v6|web.shop"}
    assert new <= set(after.types[EDS].resources)
    assert len(eds.resources) == 2, "the endpoints of the new clusters, not yet subscribed to"
    assert len(rds.resources) == 2
    # Envoy then subscribes to exactly those names: it has them, nothing more is sent.
    assert _ack(ads, eds, after, *new) == []


def test_asking_for_fewer_names_needs_no_response() -> None:
    current = _snapshot("10.244.0.5")
    ads = _subscribed(current)
    assert ads.on_request(_request(EDS, WEB4), current) == []


def test_unchanged_snapshot_sends_nothing() -> None:
    current = _snapshot("10.244.0.5")
    ads = _subscribed(current)
    assert ads.due(current) == []
    assert ads.due(_snapshot("10.244.0.5", serial=9)) == []


def test_new_names_are_answered_at_the_same_version() -> None:
    current = _snapshot("10.244.0.5")
    ads = stream.AdsStream(peer="test")
    (eds,) = ads.on_request(_request(EDS, WEB4), current)
    (again,) = _ack(ads, eds, current, WEB4, WEB6)
    assert again.version_info == eds.version_info
    assert len(again.resources) == 2


def test_request_answering_an_older_response_is_ignored() -> None:
    first = _snapshot("10.244.0.5")
    ads = stream.AdsStream(peer="test")
    (old,) = ads.on_request(_request(EDS, WEB4), first)
    (new,) = ads.due(_snapshot("10.244.0.6"))
    assert ads.on_request(_request(EDS, WEB4, WEB6, nonce=old.nonce), _snapshot("10.244.0.6")) == []
    assert new.nonce != old.nonce


def test_nack_is_logged_with_envoy_error_and_rejected_version_and_not_resent() -> None:
    good, bad = _snapshot("10.244.0.5"), _snapshot("10.244.0.6", serial=2)
    ads = _subscribed(good)
    (eds,) = ads.due(bad)
    with capture_logs() as logs:
        nack = _request(EDS, WEB4, WEB6, nonce=eds.nonce, version=good.version(EDS), error="bad endpoint")
        assert ads.on_request(nack, bad) == []
    (event,) = [e for e in logs if e["event"] == "xds_nack"]
    assert event["type"] == "EDS"
    assert event["rejected_version"] == bad.version(EDS)
    assert event["kept_version"] == good.version(EDS)
    assert event["error"] == "bad endpoint"
    assert event["log_level"] == "error"
    assert ads.due(bad) == [], "the rejected version is not sent again"
    assert ads.status().nacks == (stream.Nack(type_url=EDS, version=bad.version(EDS), message="bad endpoint"),)


def test_next_good_snapshot_after_a_nack_is_sent() -> None:
    good, bad, fixed = _snapshot("10.244.0.5"), _snapshot("10.244.0.6"), _snapshot("10.244.0.7")
    ads = _subscribed(good)
    (eds,) = ads.due(bad)
    ads.on_request(_request(EDS, WEB4, WEB6, nonce=eds.nonce, version=good.version(EDS), error="no"), bad)
    (sent,) = ads.due(fixed)
    assert sent.version_info == fixed.version(EDS)


def test_rejected_version_is_not_resent_when_it_comes_back() -> None:
    good, bad = _snapshot("10.244.0.5"), _snapshot("10.244.0.6")
    ads = _subscribed(good)
    (eds,) = ads.due(bad)
    ads.on_request(_request(EDS, WEB4, WEB6, nonce=eds.nonce, version=good.version(EDS), error="no"), bad)
    (back,) = ads.due(good)
    _ack(ads, back, good, WEB4, WEB6)
    assert ads.due(bad) == []


def test_reconnecting_sidecar_gets_the_snapshot_whatever_version_it_claims() -> None:
    # A restarted server's versions may equal what the sidecar holds, or not: always answer.
    current = _snapshot("10.244.0.5")
    ads = stream.AdsStream(peer="test")
    (cds,) = ads.on_request(_request(CDS, version=current.version(CDS), nonce="17"), current)
    assert cds.version_info == current.version(CDS)


def test_ack_is_recorded_per_type() -> None:
    current = _snapshot("10.244.0.5")
    ads = _subscribed(current)
    assert ads.status().acked == current.versions()


def test_first_request_names_the_node() -> None:
    ads = stream.AdsStream(peer="test")
    request = _request(CDS)
    request.node.id = "sidecar~10.244.0.2~web-0.shop"
    with capture_logs() as logs:
        ads.on_request(request, None)
    assert ads.status().node == "sidecar~10.244.0.2~web-0.shop"
    assert [e["event"] for e in logs] == ["xds_stream_opened"]


@pytest.mark.parametrize("type_url", ["type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", ""])
def test_unknown_type_is_logged_and_not_answered(type_url: str) -> None:
    ads = stream.AdsStream(peer="test")
    with capture_logs() as logs:
        assert ads.on_request(discovery_pb2.DiscoveryRequest(type_url=type_url), _snapshot()) == []
    assert [e["event"] for e in logs] == ["xds_unknown_type"]
