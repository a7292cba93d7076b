"""The manifest source: Kubernetes objects read from YAML and JSON files instead of the API.

It owns finding the files (a file, or every manifest under a folder), decoding their documents,
and noticing when they change. The objects themselves are converted by `ctlb.kubeobjects`, the
same conversion the API source uses, so a cluster's `kubectl get -o yaml` output replays as is.
Nothing here raises for bad input: each bad file, document or object becomes a `model.Problem`.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgspec
import structlog
import yaml

from ctlb import errors, kubeobjects, model
from ctlb.sources import inotify, store, yamldecode

log = structlog.get_logger()

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# (path, mtime_ns, size, inode) of each manifest file; None stats mark a path that is missing.
_FileSignature = tuple[str, int | None, int | None, int | None]


@dataclass(frozen=True, slots=True)
class _Documents:
    """The documents of one file, and the problem that stopped decoding it, if any."""

    documents: tuple[object, ...]
    problem: model.Problem | None = None


@dataclass(frozen=True, slots=True)
class _Decoded:
    """One file's objects, converted, in document order with a problem for each document or
    object that is not valid; and the problem that stopped decoding the file, if any."""

    items: tuple[model.KubeObject | model.Problem, ...]
    problem: model.Problem | None = None


def load(paths: Sequence[pathlib.Path]) -> model.Snapshot:
    """Read every object in the given files and folders, once.

    Args:
        paths: files, or folders searched recursively for `*.yaml`, `*.yml` and `*.json`.

    Returns:
        The valid objects, sorted by reference (a later duplicate of the same kind, namespace and
        name replaces the earlier one), and a problem for each unreadable path, undecodable file
        and invalid object.
    """
    objects = store.ObjectStore()
    ManifestReader(paths).refresh(objects)
    return objects.snapshot()


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One file's objects, by key in document order, and its problems."""

    signature: _FileSignature
    objects: dict[store.Key, model.KubeObject]
    problems: tuple[model.Problem, ...]


class ManifestReader:
    """Keeps an object store equal to what the manifests hold, decoding only changed files.

    Each refresh re-reads the files whose metadata changed and writes only the objects that
    differ into the store, so a change to one small file costs that file, whatever the rest hold.
    A file that stops decoding keeps its objects as they last were, and so does an object whose
    new version is invalid: a user's bad edit never withdraws what is served.
    """

    _PATHS_ORIGIN = "manifest paths"

    def __init__(self, paths: Sequence[pathlib.Path]) -> None:
        self.paths = tuple(paths)
        self._files: dict[pathlib.Path, _Parsed] = {}
        self._order: dict[pathlib.Path, int] = {}
        # The files holding each key: the last one in file order wins, as a later duplicate does.
        self._holders: dict[store.Key, set[pathlib.Path]] = {}

    def refresh(self, into: store.ObjectStore) -> None:
        files, problems = _manifest_files(self.paths)
        into.set_problems(self._PATHS_ORIGIN, problems)
        self._order = {path: index for index, path in enumerate(files)}
        touched: set[store.Key] = set()
        for path in [p for p in self._files if p not in self._order]:
            touched.update(self._forget(path, into))
        signatures = {path: _file_signature(path) for path in files}
        stale = [path for path in files if not self._current(path, signatures[path])]
        for path, decoded in zip(stale, _decode_all(stale), strict=True):
            cached = self._files.get(path)
            parsed = self._parsed(path, signatures[path], decoded, cached)
            touched.update(self._replace(path, cached, parsed))
            into.set_problems(_origin(path), parsed.problems)
        for key in touched:
            self._publish(key, into)

    def _current(self, path: pathlib.Path, signature: _FileSignature) -> bool:
        """Whether what was read from `path` is what it holds now (a missing file never is)."""
        cached = self._files.get(path)
        return cached is not None and cached.signature == signature and signature[1] is not None

    def _parsed(self, path: pathlib.Path, signature: _FileSignature, decoded: _Decoded,
                cached: _Parsed | None) -> _Parsed:
        into: dict[model.ObjectRef, model.KubeObject] = {}
        problems: list[model.Problem] = []
        for item in decoded.items:
            if isinstance(item, model.Problem):
                problems.append(item)
            else:
                into[item.ref] = item  # a later namesake replaces an earlier one
        if decoded.problem is not None:
            problems.append(decoded.problem)
        objects = {(ref.kind, ref.namespace, ref.name): obj for ref, obj in into.items()}
        if cached is not None and problems:
            objects = _with_last_good(objects, cached.objects, problems=problems, file_broken=decoded.problem is not None)
        return _Parsed(signature=signature, objects=objects, problems=tuple(problems))

    def _replace(self, path: pathlib.Path, old: _Parsed | None, new: _Parsed) -> set[store.Key]:
        self._files[path] = new
        old_objects = old.objects if old is not None else {}
        for key in old_objects.keys() - new.objects.keys():
            self._unhold(key, path)
        for key in new.objects.keys() - old_objects.keys():
            self._holders.setdefault(key, set()).add(path)
        return {key for key in old_objects.keys() | new.objects.keys()
                if old_objects.get(key) is not new.objects.get(key)}

    def _forget(self, path: pathlib.Path, into: store.ObjectStore) -> set[store.Key]:
        """A file that vanished: its objects go, unless another file holds them too."""
        parsed = self._files.pop(path)
        for key in parsed.objects:
            self._unhold(key, path)
        into.set_problems(_origin(path), [])
        return set(parsed.objects)

    def _unhold(self, key: store.Key, path: pathlib.Path) -> None:
        holders = self._holders[key]
        holders.discard(path)
        if not holders:
            del self._holders[key]

    def _publish(self, key: store.Key, into: store.ObjectStore) -> None:
        holders = self._holders.get(key)
        if not holders:
            into.delete(key)
            return
        winner = max(holders, key=self._order.__getitem__) if len(holders) > 1 else next(iter(holders))
        into.put(self._files[winner].objects[key])


def _origin(path: pathlib.Path) -> str:
    return f"file {path}"


def _with_last_good(
    objects: dict[store.Key, model.KubeObject],
    previous: dict[store.Key, model.KubeObject],
    *,
    problems: Sequence[model.Problem],
    file_broken: bool,
) -> dict[store.Key, model.KubeObject]:
    """`objects` plus the previous version of each object a problem made disappear.

    After a decoding error the objects past it cannot be told apart from deleted ones until the
    file is fixed, so all of the file's previous objects stay; otherwise only those a problem names.
    """
    broken = {p.ref for p in problems}
    kept = {key: obj for key, obj in previous.items()
            if key not in objects and (file_broken or str(obj.ref) in broken)}
    for obj in kept.values():
        log.warning("object_kept_last_valid_version", object=str(obj.ref))
    return {**objects, **kept}


class ManifestWatcher:
    """Tells when the manifests may have changed: file metadata compared on every call, and
    `wait()` woken by inotify as soon as a watched folder sees a write or a rename.

    The agent loops on `changed()` and `wait(interval)`; polling stays the fallback for what
    inotify cannot see (a folder that does not exist yet, a network file system).
    """

    def __init__(self, paths: Sequence[pathlib.Path], *, interval: float = 0.2) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self._last: tuple[_FileSignature, ...] | None = None
        self._inotify: inotify.Inotify | None = None

    def changed(self) -> bool:
        """True on the first call, then whenever a file appeared, vanished or was rewritten."""
        signature = _signature(self.paths)
        if signature == self._last:
            return False
        self._last = signature
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Returns when a watched folder changed, or after `timeout` (default: the interval)."""
        timeout = self.interval if timeout is None else timeout
        if self._inotify is None:
            try:
                self._inotify = inotify.Inotify()
            except OSError:
                time.sleep(timeout)  # no inotify (limits reached): plain polling
                return
        self._inotify.watch(_folders(self.paths))
        self._inotify.wait(timeout)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def _folders(paths: Sequence[pathlib.Path]) -> set[pathlib.Path]:
    """Every folder whose entries can change what is read: given folders with their sub-folders,
    and the folder of each given file (files are replaced by rename, which their folder sees)."""
    folders: set[pathlib.Path] = set()
    for path in paths:
        if path.is_dir():
            folders.add(path)
            folders.update(p for p in path.rglob("*") if p.is_dir() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
        else:
            folders.add(path.parent)
    return folders


# --- finding files ---------------------------------------------------------------------------


def _manifest_files(paths: Sequence[pathlib.Path]) -> tuple[list[pathlib.Path], list[model.Problem]]:
    files: list[pathlib.Path] = []
    problems: list[model.Problem] = []
    for path in paths:
        if path.is_dir():
            files.extend(_files_under(path))
        elif path.is_file():
            files.append(path)  # named explicitly: read it whatever its suffix
        else:
            problems.append(_file_problem(path, "does not exist or is not a regular file or folder"))
    return files, problems


def _files_under(folder: pathlib.Path) -> list[pathlib.Path]:
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        # Hidden entries are editor swap files, .git, and the ..data/..2024_* twins a ConfigMap
        # volume keeps beside its symlinks: reading them would load every object twice.
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in MANIFEST_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


def _signature(paths: Sequence[pathlib.Path]) -> tuple[_FileSignature, ...]:
    files, problems = _manifest_files(paths)
    signature: list[_FileSignature] = [(problem.ref, None, None, None) for problem in problems]
    signature.extend(_file_signature(path) for path in files)
    return tuple(signature)


def _file_signature(path: pathlib.Path) -> _FileSignature:
    try:
        stat = path.stat()
    except OSError:
        # Removed between listing and stat: it counts as missing; the next call sees it settled.
        return (str(path), None, None, None)
    return (str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino)


# --- decoding --------------------------------------------------------------------------------

# YAML takes about 55 us a document even built straight from libyaml's events (`yamldecode`):
# 20k documents (10k Services) are 1.1 s of one core. Files decode independently, so when this much
# YAML changed at once (a start-up), it is decoded and converted in worker processes, one per
# core, while this process stores each file's objects as they come back, in file order. JSON
# decodes ten times faster, straight into the model: a worker would only add the transfer.
_PARALLEL_MIN_BYTES = 1 << 20


def _decode_all(paths: Sequence[pathlib.Path]) -> Iterator[_Decoded]:
    """The documents of each file, in the order given."""
    yaml_paths = [path for path in paths if path.suffix != ".json"]
    workers = min(len(yaml_paths), os.cpu_count() or 1)
    if workers < 2 or _total_size(yaml_paths) < _PARALLEL_MIN_BYTES:
        yield from map(_decode, paths)
        return
    done = 0
    try:
        # fork: a worker starts in milliseconds with what this process imported, where spawn
        # starts a fresh interpreter and imports the agent again (0.2-0.3 s). A worker only
        # reads and decodes files: it takes no lock another thread of this process could hold.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            pending = {path: pool.submit(_decode, path) for path in yaml_paths}
            for path in paths:
                yield pending[path].result() if path in pending else _decode(path)
                done += 1
    except (concurrent.futures.process.BrokenProcessPool, OSError) as error:
        # No worker could be started or one died: what is left is decoded here.
        log.warning("manifest_workers_failed", error=str(error), decoded_here=len(paths) - done)
        yield from map(_decode, paths[done:])


def _total_size(paths: Sequence[pathlib.Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass  # gone: decoding it says so
    return total


def _decode(path: pathlib.Path) -> _Decoded:
    """One file's objects: its documents decoded and converted, in a worker when there is one,
    so that converting YAML's dictionaries is spread over the cores too."""
    read = _read_documents(path)
    return _Decoded(_converted(read.documents, source=path), read.problem)


def _read_documents(path: pathlib.Path) -> _Documents:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return _Documents((), _file_problem(path, f"cannot be read: {error.strerror or error}"))
    except UnicodeDecodeError as error:
        return _Documents((), _file_problem(path, f"is not UTF-8 text: {error.reason} at byte {error.start}"))
    if path.suffix == ".json":
        return _decode_json(path, text)
    if _JSON_OBJECT_START.match(text):
        # JSON saved as .yaml (`kubectl get -o json > all.yaml`): JSON is YAML, and decodes
        # ten times faster as JSON. Anything JSON cannot read is read as YAML, as before.
        try:
            return _Documents((_json_document(text),))
        except (msgspec.DecodeError, ValueError):
            pass
    return _decode_yaml(path, text)


def _decode_json(path: pathlib.Path, text: str) -> _Documents:
    # json, not yaml: PyYAML reads YAML 1.1 and trips over valid JSON such as tab indentation.
    try:
        return _Documents((_json_document(text),))
    except (msgspec.DecodeError, ValueError):
        pass  # the plain decoder reads what msgspec refuses (NaN), and says where a text is wrong
    try:
        return _Documents((json.loads(text),))
    except json.JSONDecodeError as error:
        reason = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        return _Documents((), _file_problem(path, reason))


class _JsonHead(msgspec.Struct, rename="camel"):
    """What `kubeobjects.expand` reads of a list document; its items are left as JSON text."""

    kind: object = None
    api_version: object = None
    items: list[msgspec.Raw] | None = None


_JSON_HEAD = msgspec.json.Decoder(_JsonHead)
_JSON_OBJECT_START = re.compile(r"\s*\{")


def _json_document(text: str) -> object:
    """A decoded JSON document. The items of a list (`kubectl get -o json`) that have a common
    shape come converted already (the rest as decoded JSON), so that 10k Services' worth of
    objects never become dicts first: `kubeobjects.expand` passes converted items through.

    Raises:
        msgspec.DecodeError, ValueError: the text is not JSON (or not JSON msgspec reads).
    """
    head = _JSON_HEAD.decode(text) if _JSON_OBJECT_START.match(text) else None
    if head is None or not isinstance(head.kind, str) or not head.kind.endswith("List") or head.items is None:
        return json.loads(text)
    item_kind = head.kind.removesuffix("List")
    items = [_json_item(raw, list_kind=item_kind, list_api_version=head.api_version) for raw in head.items]
    return {"kind": head.kind, "apiVersion": head.api_version, "items": items}


class _JsonKind(msgspec.Struct, rename="camel"):
    kind: object = None
    api_version: object = None


_JSON_KIND = msgspec.json.Decoder(_JsonKind)


def _json_item(raw: msgspec.Raw, *, list_kind: str, list_api_version: object) -> object:
    """One list item: converted when of a common shape, else decoded for `expand` and `parse`.

    A typed list's items (`ServiceList`) take the list's kind and apiVersion, as `expand` gives
    them; a plain `List`'s items carry their own.
    """
    kind: object = list_kind
    api_version = list_api_version
    if not list_kind:
        own = _JSON_KIND.decode(raw)
        kind, api_version = own.kind, own.api_version
    if isinstance(kind, str) and isinstance(api_version, str):
        converted = kubeobjects.parse_json_common(raw, kind=kind, api_version=api_version)
        if converted is not None:
            return converted
    return json.loads(bytes(raw))


def _decode_yaml(path: pathlib.Path, text: str) -> _Documents:
    documents: list[object] = []
    try:
        # Documents before a syntax error are kept: one bad edit must not withdraw a whole file.
        yamldecode.load_documents(text, documents)
    except yaml.YAMLError as error:
        return _Documents(tuple(documents), _file_problem(path, _yaml_reason(error)))
    return _Documents(tuple(documents))


def _yaml_reason(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return "invalid YAML: " + " ".join(str(error).split())


def _file_problem(path: pathlib.Path, reason: str) -> model.Problem:
    return model.Problem(ref=f"file {path}", reason=reason)


# --- objects ---------------------------------------------------------------------------------


def _converted(documents: Sequence[object], *, source: pathlib.Path) -> tuple[model.KubeObject | model.Problem, ...]:
    """The objects of a file's documents, in order, with a problem for each invalid one."""
    items: list[model.KubeObject | model.Problem] = []
    for index, document in enumerate(documents):
        items.extend(_document_objects(document, source=source, index=index))
    return tuple(items)


def _document_objects(document: object, *, source: pathlib.Path, index: int) -> list[model.KubeObject | model.Problem]:
    """One document's objects (a list holds several), or why each is not one."""
    if document is None:
        return []  # an empty document: a stray `---` or a comment-only file
    if not isinstance(document, dict):
        # Not an object at all, so it has no name: the file and position are all there is to report.
        reason = f"document {index + 1} is a {type(document).__name__}, not a Kubernetes object"
        return [_file_problem(source, reason)]
    try:
        items = kubeobjects.expand(document)
    except errors.InvalidObject as invalid:
        return [model.Problem(ref=invalid.ref, reason=invalid.reason)]
    out: list[model.KubeObject | model.Problem] = []
    for item in items:
        if isinstance(item, model.KubeObject):
            out.append(item)  # converted as it was decoded (`_json_item`)
            continue
        try:
            out.append(kubeobjects.parse(item))
        except errors.InvalidObject as invalid:
            out.append(model.Problem(ref=invalid.ref, reason=invalid.reason))
    return out
