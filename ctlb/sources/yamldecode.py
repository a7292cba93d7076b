"""YAML documents built straight from libyaml's parse events, as PyYAML's safe loader builds them.

PyYAML's C loader parses in C but builds each document in Python twice over: a node tree first,
then the objects, through generators and one dispatch per node. Kubernetes manifests use a small
part of YAML (plain and quoted scalars, block mappings and sequences), and for that part the
objects can be built from the events in one pass, with each distinct plain scalar resolved once:
about twice as fast, which is most of a start-up from 10k Services of YAML.

The result is the safe loader's, object for object: scalars are resolved and constructed by the
loader's own resolver and constructors. Anything outside that part (anchors and aliases, explicit
tags, merge keys, keys that are not scalars, a scalar the safe loader cannot construct) raises
`Unsupported`, and the caller decodes the text with the full loader instead. A syntax error is the
parser's own `yaml.YAMLError`, raised at the same event the full loader would raise it.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml import events

# libyaml's loader when PyYAML was built with it; the pure-Python one emits the same events.
LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Only these tags are built here: what the safe loader gives them is immutable, so one object can
# stand for every occurrence of the same plain scalar. The others a plain scalar can resolve to,
# merge (`<<`) and value (`=`), mean something only as keys, and only to the full loader.
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "timestamp"))


class Unsupported(Exception):
    """The text uses YAML this module does not build; decode it with the full loader."""


def load_documents(text: str, into: list[object]) -> None:
    """Append each document of `text` to `into` as it completes, as `yaml.load_all` with the safe
    loader yields them: built from the events where they allow it, else by the full loader.

    Raises:
        yaml.YAMLError: the text is not valid YAML; the documents before the error are in `into`.
    """
    try:
        decode_documents(text, into)
    except Unsupported:
        into.clear()
        for document in yaml.load_all(text, Loader=LOADER):
            into.append(document)


def decode_documents(text: str, into: list[object]) -> None:
    """Append each document of `text` to `into` as it completes.

    Raises:
        yaml.YAMLError: the text is not valid YAML; the documents before the error are in `into`.
        Unsupported: the text needs the full loader (`into` may hold some documents already).
    """
    loader = LOADER(text)
    try:
        _build(loader, into)
    finally:
        loader.dispose()


def _build(loader: Any, into: list[object]) -> None:
    """Objects from the events: collections open on a stack; a mapping's pending key waits in
    `keys` beside it, as a 1-tuple so that a key of None is told from no key."""
    get_event = loader.get_event
    plain = _PlainScalars(loader)
    stack: list[Any] = []
    keys: list[tuple[object] | None] = []
    root: object = None
    while True:
        event = get_event()
        kind = type(event)
        if kind is events.ScalarEvent:
            if event.anchor is not None or event.tag is not None:
                raise Unsupported("anchor or tag")
            value: object = plain.value(event.value) if event.implicit[0] else event.value
        elif kind is events.MappingStartEvent or kind is events.SequenceStartEvent:
            if event.anchor is not None or event.tag is not None:
                raise Unsupported("anchor or tag")
            stack.append({} if kind is events.MappingStartEvent else [])
            keys.append(None)
            continue
        elif kind is events.MappingEndEvent or kind is events.SequenceEndEvent:
            value = stack.pop()
            keys.pop()
        elif kind is events.DocumentEndEvent:
            # The full loader yields a document once its end is parsed: so does this.
            into.append(root)
            root = None
            continue
        elif kind is events.StreamEndEvent:
            return
        elif kind is events.AliasEvent:
            raise Unsupported("alias")
        else:
            continue  # stream and document starts
        if not stack:
            root = value
            continue
        top = stack[-1]
        if type(top) is list:
            top.append(value)
            continue
        key = keys[-1]
        if key is None:
            if type(value) is dict or type(value) is list:
                raise Unsupported("a key that is a collection")
            keys[-1] = (value,)
        else:
            top[key[0]] = value
            keys[-1] = None


class _PlainScalars:
    """Plain scalars resolved by the loader's implicit resolvers and built by its constructors,
    each distinct text once (a plain scalar's tag depends on its text alone)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._seen: dict[str, object] = {}

    def value(self, text: str) -> object:
        try:
            return self._seen[text]
        except KeyError:
            pass
        built = self._construct(text)
        self._seen[text] = built
        return built

    def _construct(self, text: str) -> object:
        tag = self._loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag not in _PLAIN_TAGS:  # a merge key `<<`, a value key `=`
            raise Unsupported(f"plain scalar of tag {tag}")
        construct = self._loader.yaml_constructors[tag]
        return construct(self._loader, yaml.ScalarNode(tag, text))
