"""The manifest source: Kubernetes objects read from YAML and JSON files instead of the API.

It owns finding the files (a file, or every manifest under a folder), decoding their documents,
and noticing when they change. The objects themselves are converted by `ctlb.kubeobjects`, the
same conversion the API source uses, so a cluster's `kubectl get -o yaml` output replays as is.
Nothing here raises for bad input: each bad file, document or object becomes a `model.Problem`.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from ctlb import errors, kubeobjects, model
from ctlb.sources import inotify

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# libyaml's C loader parses ~10x faster than the pure-Python one: it matters at 10k objects.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# (path, mtime_ns, size, inode) of each manifest file; None stats mark a path that is missing.
_FileSignature = tuple[str, int | None, int | None, int | None]


@dataclass(frozen=True, slots=True)
class _Decoded:
    """The documents of one file, and the problem that stopped decoding it, if any."""

    documents: tuple[object, ...]
    problem: model.Problem | None = None


def load(paths: Sequence[pathlib.Path]) -> model.Snapshot:
    """Read every object in the given files and folders.

    Args:
        paths: files, or folders searched recursively for `*.yaml`, `*.yml` and `*.json`.

    Returns:
        The valid objects, sorted by reference (a later duplicate of the same kind, namespace and
        name replaces the earlier one), and a problem for each unreadable path, undecodable file
        and invalid object.
    """
    return ManifestReader(paths).read()


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One file's objects, in document order, and its problems."""

    signature: _FileSignature
    # (kind, namespace, name) with each object: computed once per parse, since merging and
    # ordering tens of thousands of objects on every change would otherwise rebuild them all.
    objects: tuple[tuple[tuple[str, str, str], model.KubeObject], ...]
    problems: tuple[model.Problem, ...]


class ManifestReader:
    """Reads the manifests again and again, decoding only the files that changed.

    An unchanged file's objects are handed on as the very same values, so later stages can
    tell by identity what did not change.
    """

    def __init__(self, paths: Sequence[pathlib.Path]) -> None:
        self.paths = tuple(paths)
        self._files: dict[pathlib.Path, _Parsed] = {}

    def read(self) -> model.Snapshot:
        files, problems = _manifest_files(self.paths)
        self._files = {path: self._parsed(path) for path in files}
        objects: dict[tuple[str, str, str], model.KubeObject] = {}
        for parsed in self._files.values():
            objects.update(parsed.objects)
            problems.extend(parsed.problems)
        return _snapshot([obj for _, obj in sorted(objects.items(), key=_first)], problems=problems)

    def _parsed(self, path: pathlib.Path) -> _Parsed:
        signature = _file_signature(path)
        cached = self._files.get(path)
        if cached is not None and cached.signature == signature and signature[1] is not None:
            return cached
        decoded = _decode(path)
        into: dict[model.ObjectRef, model.KubeObject] = {}
        problems: list[model.Problem] = []
        for index, document in enumerate(decoded.documents):
            problems.extend(_add_objects(document, into=into, source=path, index=index))
        if decoded.problem is not None:
            problems.append(decoded.problem)
        keyed = tuple(((ref.kind, ref.namespace, ref.name), obj) for ref, obj in into.items())
        return _Parsed(signature=signature, objects=keyed, problems=tuple(problems))


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


def _decode(path: pathlib.Path) -> _Decoded:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return _Decoded((), _file_problem(path, f"cannot be read: {error.strerror or error}"))
    except UnicodeDecodeError as error:
        return _Decoded((), _file_problem(path, f"is not UTF-8 text: {error.reason} at byte {error.start}"))
    if path.suffix == ".json":
        return _decode_json(path, text)
    return _decode_yaml(path, text)


def _decode_json(path: pathlib.Path, text: str) -> _Decoded:
    # json, not yaml: PyYAML reads YAML 1.1 and trips over valid JSON such as tab indentation.
    try:
        return _Decoded((json.loads(text),))
    except json.JSONDecodeError as error:
        reason = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        return _Decoded((), _file_problem(path, reason))


def _decode_yaml(path: pathlib.Path, text: str) -> _Decoded:
    documents: list[object] = []
    try:
        # Documents before a syntax error are kept: one bad edit must not withdraw a whole file.
        for document in yaml.load_all(text, Loader=_SAFE_LOADER):
            documents.append(document)
    except yaml.YAMLError as error:
        return _Decoded(tuple(documents), _file_problem(path, _yaml_reason(error)))
    return _Decoded(tuple(documents))


def _yaml_reason(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return "invalid YAML: " + " ".join(str(error).split())


def _file_problem(path: pathlib.Path, reason: str) -> model.Problem:
    return model.Problem(ref=f"file {path}", reason=reason)


# --- objects ---------------------------------------------------------------------------------


def _add_objects(
    document: object, *, into: dict[model.ObjectRef, model.KubeObject], source: pathlib.Path, index: int
) -> list[model.Problem]:
    """Parse one document's objects into `into`, a later one replacing an earlier namesake."""
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
    problems: list[model.Problem] = []
    for item in items:
        try:
            obj = kubeobjects.parse(item)
        except errors.InvalidObject as invalid:
            problems.append(model.Problem(ref=invalid.ref, reason=invalid.reason))
            continue
        into[obj.ref] = obj
    return problems


def _first(item: tuple[tuple[str, str, str], model.KubeObject]) -> tuple[str, str, str]:
    return item[0]


def _snapshot(ordered: Sequence[model.KubeObject], *, problems: Sequence[model.Problem]) -> model.Snapshot:
    """A snapshot of objects already in reference order (kind, namespace, name)."""
    return model.Snapshot(
        services=tuple(obj for obj in ordered if isinstance(obj, model.Service)),
        endpoint_slices=tuple(obj for obj in ordered if isinstance(obj, model.EndpointSlice)),
        nodes=tuple(obj for obj in ordered if isinstance(obj, model.Node)),
        namespaces=tuple(obj for obj in ordered if isinstance(obj, model.Namespace)),
        pods=tuple(obj for obj in ordered if isinstance(obj, model.Pod)),
        problems=tuple(problems),
    )
