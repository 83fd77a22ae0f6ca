"""The one course cache: every artefact that costs time to make, keyed by everything that decides it.

An entry's key hashes

* its **configuration** (any JSON-able value: data, steps, learning rate, seeds …),
* the **source of the coursekit code that produces it** (the modules named in ``code`` plus the module
  that defines ``compute``): edit a producing function and its entries are recomputed,
* the **library versions** (python, torch, transformers, peft),
* a **full fingerprint of the starting weights** (``weights``: a model, a state dict, or a fingerprint
  string; SHA-256 over every tensor's name, dtype, shape and bytes) or of an input file.

So CI can never pass on a stale result. Writes are atomic (a temporary file renamed into place); an
entry that cannot be read is recomputed with a one-line notice. Kinds of entries:
:func:`json` (generated data, runs), :func:`tensors` (trained weights, task vectors, covariances) and
:func:`folder` (a model folder). The cache lives in ``$COURSEKIT_CACHE`` (default ``~/.cache/coursekit``).
"""
from __future__ import annotations

import hashlib
import inspect
import json as _json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import CourseError

LIBRARIES = ("torch", "transformers", "peft")


def cache_dir() -> Path:
    """The course cache folder (``$COURSEKIT_CACHE``, default ``~/.cache/coursekit``), created if needed."""
    d = Path(os.environ.get("COURSEKIT_CACHE") or Path.home() / ".cache" / "coursekit").expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CourseError(f"cannot create the course cache {d} ({e.strerror}): set COURSEKIT_CACHE to a writable folder") from None
    return d


def versions() -> dict:
    """Python and library versions that can change a cached result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def _source(obj) -> str:
    mod = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    target = mod if mod is not None and mod.__name__.split(".")[0] == "coursekit" else obj
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is None:
            raise CourseError(f"cache: cannot read the source of {target!r} to key its entries") from None
        return repr((code.co_code, code.co_consts, code.co_names))


def code_hash(*objs) -> str:
    """SHA-256 of the source of every object's module (coursekit functions, classes, modules) — or of
    the object itself when it lives outside coursekit (a notebook's function)."""
    import linecache

    linecache.checkcache()  # a file edited since it was first read must be re-read
    seen, h = set(), hashlib.sha256()
    for o in objs:
        src = _source(o)
        if src not in seen:
            seen.add(src)
            h.update(src.encode())
    return h.hexdigest()


def fingerprint(weights) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) of a model or state dict; a string is
    returned as it is (an already computed fingerprint)."""
    import torch

    if isinstance(weights, str):
        return weights
    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    if not isinstance(state, dict) or not state:
        raise CourseError("cache.fingerprint(): give a model, a non-empty state dict or a fingerprint string")
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")  # no copy of the bytes
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (e.g. the packaged GGUF)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def key(kind: str, config, code: Iterable = (), weights=None) -> str:
    """The entry key: a hash of kind, configuration, producing code, library versions and weights."""
    payload = {"kind": kind, "config": config, "code": code_hash(*code) if code else None,
               "versions": versions(), "weights": fingerprint(weights) if weights is not None else None}
    try:
        blob = _json.dumps(payload, sort_keys=True, default=_jsonable)
    except TypeError as e:
        raise CourseError(f"cache key for {kind!r}: the configuration is not JSON-able ({e})") from None
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON-able")


def _path(kind: str, k: str, suffix: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", kind) or kind.startswith("."):
        raise CourseError(f"cache kind must be 'name' or 'topic/name' in plain characters (got {kind!r})")
    return cache_dir() / f"{kind}-{k}{suffix}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)  # atomic: a half-written entry is never visible
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _notice(path: Path, err: Exception) -> None:
    reason = " ".join(str(err).split())[:120] or type(err).__name__
    print(f"coursekit cache: {path.name} is unreadable ({reason}); recomputing it", file=sys.stderr)


def _entry(kind, config, compute, code, weights, suffix, load, save, refresh=False):
    code = [*code, compute]
    path = _path(kind, key(kind, config, code, weights), suffix)
    if path.exists() and not refresh:
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed, with a notice
            _notice(path, e)
    value = compute()
    atomic_write(path, lambda tmp: save(value, tmp))
    return value


def json(kind: str, config, compute: Callable[[], object], code: Iterable = (), weights=None):
    """The JSON value cached under ``kind`` for this configuration, or ``compute()`` stored as JSON."""
    return _entry(kind, config, compute, code, weights, ".json",
                  lambda p: _json.loads(p.read_text(encoding="utf-8")),
                  lambda v, p: p.write_text(_json.dumps(v, ensure_ascii=False), encoding="utf-8"))


def tensors(kind: str, config, compute: Callable[[], dict], code: Iterable = (), weights=None,
            refresh: bool = False) -> dict:
    """A dict of tensors cached as safetensors (never pickles), or ``compute()`` stored; ``refresh=True``
    computes anew and overwrites the entry (the evidence store's live runs never read a result back)."""
    from safetensors.torch import load_file, save_file

    def save(v, p):
        if not isinstance(v, dict) or not v:
            raise CourseError(f"cache.tensors({kind!r}): compute() must return a non-empty dict of tensors")
        save_file({k: t.detach().contiguous().cpu() for k, t in v.items()}, str(p))

    return _entry(kind, config, compute, code, weights, ".safetensors", lambda p: load_file(str(p)), save, refresh)


def folder(kind: str, config, build: Callable[[Path], None], check: Callable[[Path], None],
           code: Iterable = (), weights=None) -> Path:
    """A cached folder: ``build(tmp)`` fills a temporary folder that is renamed into place;
    ``check(path)`` raises if an existing entry is unreadable (it is then rebuilt, with a notice)."""
    code = [*code, build]
    path = _path(kind, key(kind, config, code, weights), "")
    if path.exists():
        try:
            check(path)
            return path
        except Exception as e:  # noqa: BLE001
            _notice(path, e)
            shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        if path.exists():  # a concurrent writer won; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
