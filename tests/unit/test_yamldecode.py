"""YAML built from libyaml's events: the same objects, of the same types, as PyYAML's safe loader
builds; whatever it does not build is refused, and the manifest source then uses the full loader."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from ctlb.sources import manifests, yamldecode

KUBECTL_SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  annotations:
    note: |
      two lines,
      kept as written
    folded: >
      one
      line
  creationTimestamp: "2024-05-02T10:11:12Z"
  labels: {app: web, tier: "1"}
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.12.34
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
  - name: dns
    port: 53
    protocol: UDP
    targetPort: dns
  selector:
    app: web
status:
  loadBalancer: {}
"""

# Plain scalars that YAML 1.1 (and so PyYAML, and Kubernetes' YAML reader) does not read as text.
YAML11_SCALARS = """\
bools: [yes, No, on, OFF, y, n, True, false]
nulls: [~, null, Null, '']
ints: [0x1F, 0o17, 017, 1_000, -12, +7, 1:30, 0b101]
floats: [1.5, 1.5e+3, .inf, -.Inf, .nan, 6.8523015e+5, 1e3]
dates: [2001-12-14, 2001-12-14t21:59:43.10-05:00, 2001-12-14 21:59:43.10 -5]
quoted: ["yes", '80', "~", "2001-12-14"]
empty_value:
? plain key
: value
1: int key
~: null key
2001-12-14: date key
repeated: first
repeated: second
"""


def _typed(documents: list[object]) -> str:
    """repr tells True from 1 and 1.0, and writes NaN the same each time: == does neither."""
    return repr(documents)


def _fast(text: str) -> list[object]:
    documents: list[object] = []
    yamldecode.decode_documents(text, documents)
    return documents


def _full(text: str) -> list[object]:
    return list(yaml.load_all(text, Loader=yamldecode.LOADER))


@pytest.mark.parametrize(
    "text",
    [
        KUBECTL_SERVICE,
        YAML11_SCALARS,
        f"---\n{KUBECTL_SERVICE}---\n---\n# a comment\n...\n---\n{KUBECTL_SERVICE}",
        "",
        "# only a comment\n",
        "---\n",
        "just a scalar\n",
        "- a\n- [b, {c: [d, {}]}]\n- []\n",
        "a: {b: {c: {d: [1, 2, {e: f}]}}}\n",
        "%YAML 1.1\n---\nkey: value\n",
    ],
    ids=["kubectl", "yaml-1.1-scalars", "several-documents", "empty", "comment", "separator",
         "scalar-document", "nested-sequences", "nested-mappings", "version-directive"],
)
def test_what_is_built_is_what_the_safe_loader_builds(text: str) -> None:
    assert _typed(_fast(text)) == _typed(_full(text))


REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["ctlb/demo/manifests/demo.yaml", "deploy/envoy-sidecar-bootstrap.yaml"])
def test_the_projects_own_yaml_builds_as_the_safe_loader_builds_it(path: str) -> None:
    text = (REPO / path).read_text()

    assert _typed(_fast(text)) == _typed(_full(text))


@pytest.mark.parametrize(
    "text",
    [
        "base: &base {port: 80}\nother: *base\n",
        "base: &base {port: 80}\nother:\n  <<: *base\n  name: x\n",
        "a:\n  <<: {port: 80}\n",
        "port: !!str 80\n",
        "items: !!set {a, b}\n",
        "! 80\n",
        "? [a, b]\n: value\n",
        "? {a: b}\n: value\n",
        "=: value\n",
        "a: <<\n",
    ],
    ids=["alias", "merge-from-alias", "merge-key", "explicit-tag", "explicit-collection-tag",
         "non-specific-tag", "sequence-key", "mapping-key", "value-key", "merge-as-value"],
)
def test_what_it_does_not_build_is_refused(text: str) -> None:
    with pytest.raises(yamldecode.Unsupported):
        _fast(text)


def test_syntax_error_is_the_loaders_with_the_documents_before_it() -> None:
    text = f"{KUBECTL_SERVICE}---\nkind: Service\nmetadata: {{name: [oops\n"
    documents: list[object] = []

    with pytest.raises(yaml.YAMLError) as fast:
        yamldecode.decode_documents(text, documents)
    with pytest.raises(yaml.YAMLError) as full:
        _full(text)

    assert (_typed(documents), str(fast.value)) == (_typed(_full(KUBECTL_SERVICE)), str(full.value))


def test_garbage_after_a_document_withholds_it_as_the_safe_loader_does() -> None:
    documents: list[object] = []

    with pytest.raises(yaml.YAMLError):
        yamldecode.decode_documents("a: 1\n]\n", documents)

    assert documents == []


def test_what_it_refuses_is_loaded_by_the_full_loader() -> None:
    text = f"{KUBECTL_SERVICE}---\nbase: &b {{port: 80}}\nother: {{<<: *b, name: x}}\n"
    documents: list[object] = []

    yamldecode.load_documents(text, documents)

    assert _typed(documents) == _typed(_full(text))
    assert documents[1]["other"] == {"port": 80, "name": "x"}


def test_manifests_with_anchors_and_merge_keys_load_through_the_full_loader(tmp_path: pathlib.Path) -> None:
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: &l {app: web}}\n"
        "spec:\n  clusterIP: 10.96.0.10\n  selector: *l\n"
        "  ports:\n  - &http {name: http, port: 80, protocol: TCP}\n  - <<: *http\n    name: alt\n    port: 8080\n")
    plain = tmp_path / "plain" / "plain.yaml"
    plain.parent.mkdir()
    plain.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
        "spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n"
        "  ports:\n  - {name: http, port: 80, protocol: TCP}\n  - {name: alt, port: 8080, protocol: TCP}\n")

    from_anchors, from_plain = manifests.load([anchored]), manifests.load([plain])

    assert (from_anchors.services, from_anchors.problems) == (from_plain.services, ())
    assert [p.port for p in from_anchors.services[0].ports] == [80, 8080]
