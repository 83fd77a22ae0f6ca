"""The one course cache: keys cover configuration, producing code, versions and weights; writes are
atomic; unreadable entries are recomputed with a notice."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from coursekit import cache
from coursekit.errors import CourseError


def _counter():
    calls = []

    def make():
        calls.append(1)
        return {"n": len(calls), "text": "ü"}

    return calls, make


def test_json_entry_round_trip_and_config_in_key(tmp_cache):
    calls, make = _counter()
    a = cache.json("topic/thing", {"steps": 3}, make)
    b = cache.json("topic/thing", {"steps": 3}, make)
    assert a == b == {"n": 1, "text": "ü"} and len(calls) == 1
    cache.json("topic/thing", {"steps": 4}, make)
    assert len(calls) == 2
    files = sorted((tmp_cache / "topic").glob("thing-*.json"))
    assert len(files) == 2 and not list((tmp_cache / "topic").glob(".*"))  # no temporary files left


def test_unreadable_entry_is_recomputed_with_a_one_line_notice(tmp_cache, capsys):
    calls, make = _counter()
    cache.json("t/x", [1], make)
    (path,) = (tmp_cache / "t").glob("x-*.json")
    path.write_text("{broken")
    assert cache.json("t/x", [1], make) == {"n": 2, "text": "ü"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0] and "recomputing" in err[0]
    assert cache.json("t/x", [1], make)["n"] == 2  # the rewritten entry is good again


def test_editing_the_producing_function_invalidates_its_entries(tmp_cache, tmp_path, monkeypatch):
    """A warm cache with one edited producing function recomputes that artefact."""
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "producer_mod.py"
    src.write_text(textwrap.dedent("""
        CALLS = []
        def make():
            CALLS.append(1)
            return [1, 2, 3]
    """))
    mod = importlib.import_module("producer_mod")
    cache.json("t/p", {}, mod.make)
    cache.json("t/p", {}, mod.make)
    assert len(mod.CALLS) == 1
    src.write_text(src.read_text().replace("[1, 2, 3]", "[1, 2, 4]"))
    mod = importlib.reload(mod)
    assert cache.json("t/p", {}, mod.make) == [1, 2, 4] and len(mod.CALLS) == 1  # recomputed after the edit
    sys.modules.pop("producer_mod", None)


def test_coursekit_producers_are_keyed_by_their_whole_module():
    from coursekit import replay

    assert cache.code_hash(replay.cached) == cache.code_hash(replay)
    assert cache.code_hash(replay.cached) != cache.code_hash(cache.json)


def test_weights_and_versions_are_in_the_key(tiny, monkeypatch):
    model, _ = tiny
    k1 = cache.key("t/w", {}, weights=model)
    assert cache.key("t/w", {}, weights=model) == k1 == cache.key("t/w", {}, weights=cache.fingerprint(model))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6  # one weight, one ulp-sized change
    assert cache.key("t/w", {}, weights=model) != k1
    k2 = cache.key("t/w", {})
    monkeypatch.setattr(cache, "versions", lambda: {"torch": "0.0"})
    assert cache.key("t/w", {}) != k2


def test_tensor_entries_are_safetensors_and_rebuilt_when_corrupt(tmp_cache, capsys):
    calls = []

    def make():
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3)}

    a = cache.tensors("t/tens", {"a": 1}, make)
    (path,) = (tmp_cache / "t").glob("tens-*.safetensors")
    path.write_bytes(b"\x00" * 10)
    b = cache.tensors("t/tens", {"a": 1}, make)
    assert torch.equal(a["w"], b["w"]) and len(calls) == 2 and "unreadable" in capsys.readouterr().err
    with pytest.raises(CourseError, match="non-empty dict of tensors"):
        cache.tensors("t/empty", {}, lambda: {})


def test_folder_entries_and_bad_kinds(tmp_cache):
    built = []

    def build(tmp):
        built.append(1)
        (tmp / "f.txt").write_text("ok")

    def check(p):
        assert (p / "f.txt").read_text() == "ok"

    p1 = cache.folder("m/model", {"v": 1}, build, check)
    p2 = cache.folder("m/model", {"v": 1}, build, check)
    assert p1 == p2 and len(built) == 1
    (p1 / "f.txt").write_text("half written")
    cache.folder("m/model", {"v": 1}, build, check)
    assert len(built) == 2
    with pytest.raises(CourseError, match="cache kind"):
        cache.json("../escape", {}, lambda: 1)


def test_packaged_model_folder_is_keyed_by_the_gguf(tmp_cache, monkeypatch):
    """The dequantized model's folder name changes with the GGUF's bytes (here: a stand-in file)."""
    from coursekit import models

    gguf = tmp_cache / "pkg" / "m.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"v1")
    a = cache.key("models/x", {}, weights=cache.file_fingerprint(gguf))
    gguf.write_bytes(b"v2")
    assert cache.key("models/x", {}, weights=cache.file_fingerprint(gguf)) != a
    assert callable(models._materialize_packaged)


def test_fingerprint_is_sha256_over_name_dtype_shape_and_bytes():
    # the documented digest, so hashing without a copy of the bytes keeps every existing cache key
    import hashlib

    import torch

    state = {"b": torch.arange(5), "a": torch.randn(3, 4), "c": torch.randn(4, 6)[:, ::2], "e": torch.zeros(0)}
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes(t.view(torch.uint8).numpy()) if t.numel() else b"")
    assert cache.fingerprint(state) == h.hexdigest()
    state["a"][0, 0] += 1.0
    assert cache.fingerprint(state) != h.hexdigest()
