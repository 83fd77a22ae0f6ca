"""The shared "old abilities" measure and the notebook-00 notes share no text with anything else in data/.

``data/old_abilities.json`` holds held-out instructions whose answers by the foundation model measure
forgetting; if any of them (or a close paraphrase) were trained on or probed elsewhere in the course, the
measure would be contaminated. This test loads every JSON / JSONL file in ``data/`` (skipping ``//`` comment
lines), collects every string value of at least 12 characters (questions, prompts, prefixes, targets, texts,
notes, requests, ...), and checks the old-ability instructions against all of them after normalisation.
It also checks the schema of ``data/notes.jsonl`` and that its subjects are new.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
OLD = "old_abilities.json"
NOTES = "notes.jsonl"
KINDS = {"fact", "howto", "open", "task"}
MIN_LEN = 12
JACCARD_MAX = 0.6


def load(path: Path):
    """A .json file as one object; a .jsonl file as a list of records (blank and ``//`` lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("//"):
            continue
        try:
            out.append(json.loads(s))
        except json.JSONDecodeError as e:  # pragma: no cover - message only
            raise AssertionError(f"{path.name} line {i}: not valid JSON ({e})") from None
    return out


def strings(obj):
    """Every string value in a JSON value, recursively (dict values and list items)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def norm(s: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def words(s: str) -> set[str]:
    return set(norm(s).split())


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / max(1, len(wa | wb))


def contains(big: str, small: str) -> bool:
    """Whole-word containment of normalised ``small`` in normalised ``big``."""
    return f" {norm(small)} " in f" {norm(big)} "


def data_files() -> list[Path]:
    return sorted(p for p in DATA.iterdir() if p.suffix in (".json", ".jsonl"))


@pytest.fixture(scope="module")
def old():
    return load(DATA / OLD)


@pytest.fixture(scope="module")
def notes():
    return load(DATA / NOTES)


@pytest.fixture(scope="module")
def other_strings():
    """``(file name, string)`` for every string of ≥ 12 characters in every data file but old_abilities.json."""
    out = []
    for p in data_files():
        if p.name == OLD:
            continue
        seen = set()
        for s in strings(load(p)):
            if len(s.strip()) >= MIN_LEN and norm(s) not in seen:
                seen.add(norm(s))
                out.append((p.name, s))
    return out


def instructions(old) -> list[tuple[str, str]]:
    return [(it["id"], it["instruction"]) for half in ("fit", "eval") for it in old[half]]


def test_every_data_file_loads():
    files = data_files()
    assert any(p.name == OLD for p in files) and any(p.name == NOTES for p in files)
    for p in files:
        assert load(p), f"{p.name} is empty"


def test_old_abilities_schema(old):
    assert isinstance(old.get("comment"), str) and old["comment"].strip(), "old_abilities.json: 'comment' missing"
    ids = []
    for half in ("fit", "eval"):
        items = old.get(half)
        assert isinstance(items, list) and len(items) >= 60, f"old_abilities.json: '{half}' needs >= 60 items"
        counts = {k: 0 for k in KINDS}
        for it in items:
            assert set(it) == {"id", "kind", "instruction"}, f"old_abilities.json {it.get('id')}: fields {sorted(it)}"
            assert it["id"].startswith(f"{half}-"), f"old_abilities.json {it['id']}: id must start with '{half}-'"
            assert it["kind"] in KINDS, f"old_abilities.json {it['id']}: kind {it['kind']!r} not in {sorted(KINDS)}"
            assert isinstance(it["instruction"], str) and len(it["instruction"].split()) >= 4, \
                f"old_abilities.json {it['id']}: instruction too short"
            counts[it["kind"]] += 1
            ids.append(it["id"])
        for k, n in counts.items():
            assert 0.2 <= n / len(items) <= 0.3, f"old_abilities.json '{half}': kind {k!r} has {n} of {len(items)} items"
    dup = [i for i in set(ids) if ids.count(i) > 1]
    assert not dup, f"old_abilities.json: duplicate ids {dup}"


def test_old_abilities_fit_eval_disjoint(old):
    fit = {norm(it["instruction"]): it["id"] for it in old["fit"]}
    for it in old["eval"]:
        assert norm(it["instruction"]) not in fit, \
            f"old_abilities.json {it['id']} repeats {fit[norm(it['instruction'])]}: {it['instruction']!r}"
    # no repeats or near-duplicates anywhere inside the file (across halves included)
    for (ia, a), (ib, b) in itertools.combinations(instructions(old), 2):
        assert norm(a) != norm(b), f"old_abilities.json {ia} and {ib} are the same instruction: {a!r}"
        assert jaccard(a, b) < JACCARD_MAX, f"old_abilities.json {ia} and {ib} are near-duplicates: {a!r} / {b!r}"


def test_old_abilities_share_no_text_with_other_data(old, other_strings):
    assert len(other_strings) > 100, "too few strings collected from the other data files"
    for iid, ins in instructions(old):
        for fname, s in other_strings:
            assert norm(ins) != norm(s), f"old_abilities.json {iid} {ins!r} equals a string in {fname}"
            assert not contains(ins, s), f"old_abilities.json {iid} {ins!r} contains {s!r} from {fname}"
            assert not contains(s, ins), f"old_abilities.json {iid} {ins!r} is contained in {s!r} from {fname}"
            j = jaccard(ins, s)
            assert j < JACCARD_MAX, f"old_abilities.json {iid} {ins!r} is too close to {s!r} from {fname} (Jaccard {j:.2f})"


def subject_key(s: str) -> str:
    n = norm(s)
    return n[4:] if n.startswith("the ") else n


def test_notes_schema(notes):
    assert len(notes) >= 40, f"notes.jsonl: {len(notes)} records, need >= 40"
    ids, subjects = set(), set()
    for r in notes:
        rid = r.get("id")
        for f in ("id", "subject", "question", "prefix", "target_new", "target_true", "note"):
            assert isinstance(r.get(f), str) and r[f].strip(), f"notes.jsonl {rid}: field {f!r} must be a non-empty string"
        assert rid not in ids, f"notes.jsonl: id {rid!r} is used twice"
        ids.add(rid)
        key = subject_key(r["subject"])
        assert key not in subjects, f"notes.jsonl {rid}: subject {r['subject']!r} is used twice"
        subjects.add(key)
        for f in ("target_new", "target_true"):
            t = r[f]
            assert t.startswith(" ") and not t.startswith("  ") and t.endswith("."), \
                f"notes.jsonl {rid}: {f} {t!r} must start with one space and end with '.'"
        assert norm(r["target_new"]) != norm(r["target_true"]), f"notes.jsonl {rid}: target_new equals target_true"
        assert r["subject"].lower() in r["note"].lower(), f"notes.jsonl {rid}: note does not name {r['subject']!r}"
        assert norm(r["target_new"]) in norm(r["note"]), f"notes.jsonl {rid}: note does not state the new target"
        reph = r.get("rephrase")
        assert isinstance(reph, list) and len(reph) >= 1, f"notes.jsonl {rid}: needs >= 1 rephrase"
        for j, p in enumerate(reph):
            assert isinstance(p, dict) and isinstance(p.get("question"), str) and p["question"].strip(), \
                f"notes.jsonl {rid}: rephrase[{j}].question must be a non-empty string"
            assert isinstance(p.get("prefix"), str) and p["prefix"].strip(), \
                f"notes.jsonl {rid}: rephrase[{j}].prefix must be a non-empty string"
            assert norm(p["question"]) != norm(r["question"]), f"notes.jsonl {rid}: rephrase[{j}] repeats the question"


def test_notes_subjects_are_new(notes, old):
    taken = {}
    for name in ("edits.jsonl", "counterfact.jsonl"):
        for r in load(DATA / name):
            taken[subject_key(r["subject"])] = name
    for r in notes:
        key = subject_key(r["subject"])
        for other, fname in taken.items():
            assert key != other and not contains(key, other) and not contains(other, key), \
                f"notes.jsonl {r['id']}: subject {r['subject']!r} overlaps subject {other!r} of {fname}"
        for iid, ins in instructions(old):
            assert not contains(ins, key), \
                f"notes.jsonl {r['id']}: subject {r['subject']!r} appears in old_abilities.json {iid} {ins!r}"
