"""The manifest source: files and folders of `kubectl get -o yaml` output to a Snapshot."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
from collections.abc import Callable

import pytest
import yaml

from ctlb import model
from ctlb.sources import manifests, store

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: "2024-05-02T10:11:12Z"
  labels:
    app: web
  name: web
  namespace: shop
  resourceVersion: "48213"
  uid: 6f1d2b1e-9a7c-4d33-8d0e-2c5b7e1f4a10
spec:
  clusterIP: 10.96.12.34
  clusterIPs:
  - 10.96.12.34
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
  selector:
    app: web
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"""

ENDPOINT_SLICE = """\
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-1
kind: EndpointSlice
metadata:
  creationTimestamp: "2024-05-02T10:11:12Z"
  generateName: web-
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-x7k2p
  namespace: shop
  resourceVersion: "48377"
  uid: 1d55c4e7-4b8e-9f5a-7d4e-2b1c3a990c4e
ports:
- name: http
  port: 8080
  protocol: TCP
"""

NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: node-1
  resourceVersion: "51002"
  uid: 7d4e2b1c-3a99-0c4e-7a52-1d554b8e9f5a
status:
  addresses:
  - address: 172.18.0.3
    type: InternalIP
  - address: node-1
    type: Hostname
"""

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  labels:
    kubernetes.io/metadata.name: shop
  name: shop
  uid: 4b8e9f5a-7d4e-2b1c-3a99-0c4e7a521d55
"""

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web-7c9d8b5f4-abcde
  namespace: shop
  uid: 2b7e1f4a-6f1d-4d33-9a7c-8d0e2c5b7e10
spec:
  nodeName: node-1
status:
  podIP: 10.244.1.5
  podIPs:
  - ip: 10.244.1.5
"""


def _documents(*texts: str) -> str:
    return "---\n".join(texts)


def _write(path: pathlib.Path, text: str | bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _refs(snapshot: model.Snapshot) -> list[str]:
    everything: tuple[model.KubeObject, ...] = (
        *snapshot.services, *snapshot.endpoint_slices, *snapshot.nodes, *snapshot.namespaces, *snapshot.pods)
    return [str(obj.ref) for obj in everything]


def _renamed(text: str, name: str) -> str:
    return text.replace("name: web\n", f"name: {name}\n", 1)


# --- load ------------------------------------------------------------------------------------


def test_multi_document_file_loads_every_kind(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "cluster.yaml", _documents(SERVICE, ENDPOINT_SLICE, NODE, NAMESPACE, POD))

    snapshot = manifests.load([path])

    assert (_refs(snapshot), snapshot.problems) == (
        ["Service shop/web", "EndpointSlice shop/web-x7k2p", "Node node-1", "Namespace shop",
         "Pod shop/web-7c9d8b5f4-abcde"],
        (),
    )


def test_folder_is_searched_recursively_for_yaml_yml_and_json(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "services" / "web.yaml", SERVICE)
    _write(tmp_path / "slices" / "deep" / "web.yml", ENDPOINT_SLICE)
    _write(tmp_path / "node.json", json.dumps(yaml.safe_load(NODE), indent="\t"))
    _write(tmp_path / "README.txt", NAMESPACE)

    snapshot = manifests.load([tmp_path])

    assert (_refs(snapshot), snapshot.problems) == (["Service shop/web", "EndpointSlice shop/web-x7k2p",
                                                     "Node node-1"], ())


@pytest.mark.parametrize(
    "hidden",
    ["..2024_05_02_10_11_12.123/web.yaml", ".git/web.yaml", ".web.yaml"],
    ids=["configmap-volume-twin", "hidden-folder", "hidden-file"],
)
def test_hidden_files_and_folders_are_not_read(tmp_path: pathlib.Path, hidden: str) -> None:
    _write(tmp_path / hidden, "kind: [unclosed")

    assert manifests.load([tmp_path]) == model.Snapshot()


def test_file_named_explicitly_is_read_whatever_its_suffix(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "web.manifest", SERVICE)

    assert _refs(manifests.load([path])) == ["Service shop/web"]


def test_kubectl_list_output_is_expanded(tmp_path: pathlib.Path) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
               "items": [yaml.safe_load(SERVICE), yaml.safe_load(ENDPOINT_SLICE)]}
    path = _write(tmp_path / "all.yaml", yaml.safe_dump(listing))

    assert _refs(manifests.load([path])) == ["Service shop/web", "EndpointSlice shop/web-x7k2p"]


def test_invalid_object_becomes_a_problem_and_the_rest_is_loaded(tmp_path: pathlib.Path) -> None:
    bad = _renamed(SERVICE, "bad").replace("port: 80", "port: 80000")
    path = _write(tmp_path / "services.yaml", _documents(bad, SERVICE))

    snapshot = manifests.load([path])

    assert (_refs(snapshot), snapshot.problems) == (
        ["Service shop/web"],
        (model.Problem("Service shop/bad", "spec.ports[0].port 80000 is out of range 1..65535"),),
    )


def test_yaml_syntax_error_is_a_problem_naming_the_file_and_other_files_still_load(tmp_path: pathlib.Path) -> None:
    broken = _write(tmp_path / "a-broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [web\n")
    _write(tmp_path / "b-good.yaml", SERVICE)

    snapshot = manifests.load([tmp_path])

    (problem,) = snapshot.problems
    assert (_refs(snapshot), problem.ref, problem.reason.startswith("invalid YAML at line")) == (
        ["Service shop/web"], f"file {broken}", True)


def test_documents_before_a_yaml_syntax_error_are_kept(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "cluster.yaml", _documents(SERVICE, "kind: Service\nmetadata: {name: [oops\n"))

    snapshot = manifests.load([path])

    assert (_refs(snapshot), [p.ref for p in snapshot.problems]) == (["Service shop/web"], [f"file {path}"])


def test_json_syntax_error_is_a_problem_naming_the_file(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "node.json", '{"apiVersion": "v1",')

    (problem,) = manifests.load([path]).problems

    assert (problem.ref, problem.reason.startswith("invalid JSON at line 1")) == (f"file {path}", True)


def test_file_that_is_not_utf8_is_a_problem(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "web.yaml", b"kind: Service\nmetadata: {name: \xff}\n")

    (problem,) = manifests.load([path]).problems

    assert (problem.ref, "UTF-8" in problem.reason) == (f"file {path}", True)


@pytest.mark.parametrize(
    "text",
    ["", "---\n---\n", "# only a comment\n", f"---\n{SERVICE}---\n"],
    ids=["empty-file", "only-separators", "only-a-comment", "separators-around-an-object"],
)
def test_empty_documents_are_skipped(tmp_path: pathlib.Path, text: str) -> None:
    snapshot = manifests.load([_write(tmp_path / "x.yaml", text)])

    assert (len(snapshot.services), snapshot.problems) == (text.count("kind: Service"), ())


def test_document_that_is_not_an_object_is_a_problem_naming_the_file(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "x.yaml", _documents(SERVICE, "- just\n- a list\n"))

    snapshot = manifests.load([path])

    assert (_refs(snapshot), snapshot.problems) == (
        ["Service shop/web"],
        (model.Problem(f"file {path}", "document 2 is a list, not a Kubernetes object"),),
    )


def test_missing_path_is_a_problem_not_an_exception(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    present = _write(tmp_path / "web.yaml", SERVICE)

    snapshot = manifests.load([missing, present])

    assert (_refs(snapshot), [p.ref for p in snapshot.problems]) == (["Service shop/web"], [f"file {missing}"])


def test_unreadable_file_is_a_problem(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "web.yaml", SERVICE)

    def refuse(self: pathlib.Path, encoding: str | None = None) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    # Root reads a mode-000 file anyway, so the refusal is simulated at the read itself.
    monkeypatch.setattr(pathlib.Path, "read_text", refuse)

    (problem,) = manifests.load([path]).problems

    assert (problem.ref, problem.reason) == (f"file {path}", "cannot be read: Permission denied")


def test_later_duplicate_replaces_the_earlier_one_without_a_problem(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "a.yaml", SERVICE)
    _write(tmp_path / "b.yaml", SERVICE.replace("port: 80", "port: 8000"))

    snapshot = manifests.load([tmp_path])

    assert ([s.ports[0].port for s in snapshot.services], snapshot.problems) == ([8000], ())


def test_objects_are_sorted_by_reference_whatever_the_file_order(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "x.yaml", _documents(_renamed(SERVICE, "zeta"), _renamed(SERVICE, "alpha")))

    assert _refs(manifests.load([path])) == ["Service shop/alpha", "Service shop/zeta"]


# --- ManifestWatcher -------------------------------------------------------------------------


def _settled(watcher: manifests.ManifestWatcher) -> manifests.ManifestWatcher:
    watcher.changed()
    return watcher


def test_watcher_reports_a_change_on_the_first_call_only_while_nothing_changes(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "web.yaml", SERVICE)
    watcher = manifests.ManifestWatcher([tmp_path])

    assert [watcher.changed(), watcher.changed(), watcher.changed()] == [True, False, False]


def test_watcher_keeps_its_polling_interval() -> None:
    assert manifests.ManifestWatcher([], interval=1.5).interval == 1.5


def _rewrite_same_size(path: pathlib.Path) -> None:
    stat = path.stat()
    path.write_text(path.read_text().replace("web", "wep"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def _replace_by_rename(path: pathlib.Path) -> None:
    stat = path.stat()
    fresh = _write(path.with_name(".fresh"), path.read_text())
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh.replace(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda path: _write(path, SERVICE + "# grown\n"),
        _rewrite_same_size,
        _replace_by_rename,
        lambda path: _write(path.parent / "slices" / "web.yaml", ENDPOINT_SLICE),
        lambda path: path.unlink(),
    ],
    ids=["size", "mtime", "inode", "new-file", "removed-file"],
)
def test_watcher_reports_a_changed_file_signature(
    tmp_path: pathlib.Path, change: Callable[[pathlib.Path], object]
) -> None:
    path = _write(tmp_path / "web.yaml", SERVICE)
    watcher = _settled(manifests.ManifestWatcher([tmp_path]))

    change(path)

    assert (watcher.changed(), watcher.changed()) == (True, False)


def test_watcher_ignores_files_that_are_not_manifests(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "web.yaml", SERVICE)
    watcher = _settled(manifests.ManifestWatcher([tmp_path]))

    _write(tmp_path / "notes.txt", "hello")

    assert watcher.changed() is False


def test_watcher_reports_a_missing_path_appearing(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "web.yaml"
    watcher = _settled(manifests.ManifestWatcher([path]))

    _write(path, SERVICE)

    assert watcher.changed() is True


def _refreshed(reader: manifests.ManifestReader, objects: store.ObjectStore) -> store.Changes | None:
    reader.refresh(objects)
    return objects.take()


def test_refresh_writes_only_the_objects_that_changed(tmp_path: pathlib.Path) -> None:
    """Later stages work per change: an untouched file must not be decoded again, nor its
    objects reported as changed."""
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(SERVICE)
    b.write_text(SERVICE.replace("name: web", "name: other"))
    reader, objects = manifests.ManifestReader([tmp_path]), store.ObjectStore()
    first = _refreshed(reader, objects)
    assert first is not None and set(first.keys) == {("Service", "shop", "web"), ("Service", "shop", "other")}
    web = objects.get(("Service", "shop", "web"))
    b.write_text(SERVICE.replace("name: web", "name: other").replace("10.96.12.34", "10.96.12.35"))
    second = _refreshed(reader, objects)
    assert second is not None and list(second.keys) == [("Service", "shop", "other")]
    assert objects.get(("Service", "shop", "web")) is web
    other = objects.get(("Service", "shop", "other"))
    assert isinstance(other, model.Service) and str(other.cluster_ips[0]) == "10.96.12.35"
    assert _refreshed(reader, objects) is None


def test_removed_file_deletes_its_objects_unless_another_file_holds_them(tmp_path: pathlib.Path) -> None:
    a = _write(tmp_path / "a.yaml", SERVICE)
    b = _write(tmp_path / "b.yaml", SERVICE.replace("10.96.12.34", "10.96.12.35"))
    reader, objects = manifests.ManifestReader([tmp_path]), store.ObjectStore()
    reader.refresh(objects)
    web = objects.get(("Service", "shop", "web"))
    assert isinstance(web, model.Service) and str(web.cluster_ips[0]) == "10.96.12.35", "the later file wins"
    b.unlink()
    reader.refresh(objects)
    web = objects.get(("Service", "shop", "web"))
    assert isinstance(web, model.Service) and str(web.cluster_ips[0]) == "10.96.12.34"
    a.unlink()
    reader.refresh(objects)
    assert objects.keys("Service") == []


def test_object_turned_invalid_keeps_its_last_valid_version_until_fixed(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "a.yaml", SERVICE)
    reader, objects = manifests.ManifestReader([tmp_path]), store.ObjectStore()
    reader.refresh(objects)
    valid = objects.get(("Service", "shop", "web"))
    _write(path, SERVICE.replace("port: 80", "port: 70000"))
    reader.refresh(objects)
    assert objects.get(("Service", "shop", "web")) is valid
    assert [p.ref for p in objects.problems()] == ["Service shop/web"]
    _write(path, SERVICE.replace("10.96.12.34", "10.96.12.99"))
    reader.refresh(objects)
    web = objects.get(("Service", "shop", "web"))
    assert isinstance(web, model.Service) and str(web.cluster_ips[0]) == "10.96.12.99"
    assert objects.problems() == []


def test_file_that_stops_decoding_keeps_all_its_objects(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "a.yaml", SERVICE + "---\n" + SERVICE.replace("name: web", "name: api"))
    reader, objects = manifests.ManifestReader([tmp_path]), store.ObjectStore()
    reader.refresh(objects)
    _write(path, SERVICE + "---\nkind: [unclosed\n")
    reader.refresh(objects)
    assert sorted(objects.keys("Service")) == [("Service", "shop", "api"), ("Service", "shop", "web")]
    assert [p.ref for p in objects.problems()] == [f"file {path}"]


def test_deleted_object_is_not_kept(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "a.yaml", SERVICE + "---\n" + SERVICE.replace("name: web", "name: api"))
    reader, objects = manifests.ManifestReader([tmp_path]), store.ObjectStore()
    reader.refresh(objects)
    _write(path, SERVICE)
    reader.refresh(objects)
    assert objects.keys("Service") == [("Service", "shop", "web")]


def test_watcher_wakes_at_once_when_a_file_is_renamed_into_place(tmp_path: pathlib.Path) -> None:
    """A change must not wait for the next poll: inotify wakes `wait()` (a 5 s timeout here)."""
    import threading
    import time

    def write() -> None:
        (tmp_path / ".x.tmp").write_text(SERVICE)
        os.replace(tmp_path / ".x.tmp", tmp_path / "x.yaml")

    watcher = manifests.ManifestWatcher([tmp_path], interval=5.0)
    try:
        assert watcher.changed()
        watcher.wait(0.01)  # arms the watches
        writer = threading.Timer(0.2, write)
        writer.start()
        started = time.monotonic()
        watcher.wait()
        woke = time.monotonic() - started
        writer.join()
        assert woke < 4.0, "wait() slept through the change"
        watcher.wait(0.05)  # drain the rename's second event
        assert watcher.changed()
    finally:
        watcher.close()


# --- JSON, read straight into the model; YAML, decoded by worker processes -------------------

def _objects(snapshot: model.Snapshot) -> tuple[tuple[model.KubeObject, ...], ...]:
    return (snapshot.services, snapshot.endpoint_slices, snapshot.nodes, snapshot.namespaces, snapshot.pods)


def _mixed_list(kind: str = "List") -> dict[str, object]:
    """A `kubectl get -o json` listing with common, uncommon, invalid and odd items."""
    service, endpoint_slice = yaml.safe_load(SERVICE), yaml.safe_load(ENDPOINT_SLICE)
    affinity = {**service, "metadata": {"name": "sticky", "namespace": "shop"},
                "spec": {**service["spec"], "sessionAffinity": "ClientIP"}}
    bad_port = {**service, "metadata": {"name": "bad", "namespace": "shop"},
                "spec": {**service["spec"], "ports": [{"port": 80000}]}}
    nested = {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(NAMESPACE)]}
    return {"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": ""},
            "items": [service, endpoint_slice, affinity, bad_port, nested, yaml.safe_load(NODE),
                      yaml.safe_load(POD), {"kind": "Service"}, ["not", "an", "object"], None]}


def _load_as(tmp_path: pathlib.Path, name: str, text: str) -> model.Snapshot:
    folder = tmp_path / name
    _write(folder / name, text)
    return manifests.load([folder])


@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "indented"])
def test_json_listing_read_straight_into_the_model_equals_reading_it_as_yaml(tmp_path: pathlib.Path,
                                                                           indent: int | None) -> None:
    listing = _mixed_list()
    from_json = _load_as(tmp_path, "all.json", json.dumps(listing, indent=indent))
    from_yaml = _load_as(tmp_path, "all.yml", yaml.safe_dump(listing))

    assert from_json.services and from_json.endpoint_slices
    assert _objects(from_json) == _objects(from_yaml)
    assert [p.reason for p in from_json.problems] == [p.reason for p in from_yaml.problems]


def test_items_of_a_typed_json_listing_take_its_kind_unless_they_name_their_own(tmp_path: pathlib.Path) -> None:
    service = yaml.safe_load(SERVICE)
    item = {key: value for key, value in service.items() if key not in ("kind", "apiVersion")}
    listing = {"apiVersion": "v1", "kind": "ServiceList", "items": [item, {**item, "kind": "Pod"}]}

    snapshot = _load_as(tmp_path, "services.json", json.dumps(listing))

    assert (_refs(snapshot), snapshot.problems) == (["Service shop/web", "Pod shop/web"], ())


def test_json_in_a_yaml_file_is_read_as_json(tmp_path: pathlib.Path) -> None:
    text = json.dumps(_mixed_list(), indent="\t")  # tab indentation: JSON, but not YAML 1.1
    as_yaml_file = _load_as(tmp_path, "all.yaml", text)
    as_json_file = _load_as(tmp_path, "all.json", text)

    assert as_yaml_file.services
    assert _objects(as_yaml_file) == _objects(as_json_file)
    assert [p.reason for p in as_yaml_file.problems] == [p.reason for p in as_json_file.problems]


def test_yaml_flow_mapping_that_is_not_json_is_still_read_as_yaml(tmp_path: pathlib.Path) -> None:
    snapshot = _load_as(tmp_path, "ns.yaml", "{apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n")

    assert _refs(snapshot) == ["Namespace shop"]


def test_json_that_msgspec_refuses_is_still_read(tmp_path: pathlib.Path) -> None:
    text = json.dumps(_mixed_list()).replace('"resourceVersion": ""', '"resourceVersion": NaN')

    assert _refs(_load_as(tmp_path, "nan.json", text)) == _refs(_load_as(tmp_path, "plain.json", json.dumps(_mixed_list())))


def test_many_yaml_files_decoded_by_workers_load_as_they_do_here(tmp_path: pathlib.Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        _write(tmp_path / f"f{i}.yaml", _documents(_renamed(SERVICE, f"web{i}"), ENDPOINT_SLICE, "- a list\n"))
    _write(tmp_path / "broken.yaml", _documents(_renamed(SERVICE, "early"), "kind: Service\nmetadata: {name: [\n"))
    _write(tmp_path / "list.json", json.dumps(_mixed_list()))
    here = manifests.load([tmp_path])
    pools = []

    class CountedPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            pools.append(self)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(manifests, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(manifests.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(manifests.concurrent.futures, "ProcessPoolExecutor", CountedPool)

    in_workers = manifests.load([tmp_path])

    assert (len(pools), len(here.services)) == (1, 8)
    assert in_workers == here
