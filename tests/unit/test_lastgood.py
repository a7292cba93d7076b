"""The source keeps the last valid version of an object while its new version is broken."""

from __future__ import annotations

import ipaddress

from ctlb import model
from ctlb.sources import lastgood


def svc(name: str, ip: str = "10.96.0.1") -> model.Service:
    return model.Service(namespace="default", name=name, type=model.ServiceType.CLUSTER_IP,
                         ports=(model.ServicePort("http", model.Protocol.TCP, 80, 8080),),
                         cluster_ips=(ipaddress.ip_address(ip),))


def test_object_named_by_a_problem_keeps_its_last_valid_version() -> None:
    lg = lastgood.LastGood()
    lg.merge(model.Snapshot(services=(svc("web"),)))
    merged = lg.merge(model.Snapshot(problems=(model.Problem("Service default/web", "bad port"),)))
    assert merged.services == (svc("web"),)
    assert merged.problems == (model.Problem("Service default/web", "bad port"),)


def test_deleted_object_is_not_kept() -> None:
    lg = lastgood.LastGood()
    lg.merge(model.Snapshot(services=(svc("web"),)))
    assert lg.merge(model.Snapshot()).services == ()


def test_broken_file_keeps_every_object_it_may_have_held() -> None:
    lg = lastgood.LastGood()
    lg.merge(model.Snapshot(services=(svc("a"), svc("b", "10.96.0.2"))))
    merged = lg.merge(model.Snapshot(services=(svc("a"),),
                                     problems=(model.Problem("file /m/x.yaml", "syntax error"),)))
    assert {s.name for s in merged.services} == {"a", "b"}


def test_new_valid_version_replaces_the_kept_one() -> None:
    lg = lastgood.LastGood()
    lg.merge(model.Snapshot(services=(svc("web"),)))
    lg.merge(model.Snapshot(problems=(model.Problem("Service default/web", "bad"),)))
    merged = lg.merge(model.Snapshot(services=(svc("web", "10.96.0.9"),)))
    assert merged.services == (svc("web", "10.96.0.9"),)
