"""The course's own small data files, validated on load.

Every file lives in ``data/`` (schemas in ``data/README.md``). A malformed file raises a
:class:`CourseError` naming the file, the record and the field, e.g.::

    CourseError: data/edits.jsonl line 3 (id 'luffy'): field 'target_new' must be a non-empty string
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CourseError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_path(name: str) -> Path:
    """Path of a course data file (also works from an installed package next to a checkout)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return DATA_DIR / name


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(DATA_DIR.parent))
    except ValueError:
        return str(path)


def read_jsonl(name: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, record)`` pairs of a JSONL file; blank lines and ``//`` comments skipped."""
    path = data_path(str(name))
    if not path.exists():
        raise CourseError(f"data file {_rel(path)} not found (run from the course checkout, or pass a path)")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("//"):
            continue
        try:
            rec = json.loads(s)
        except json.JSONDecodeError as e:
            raise CourseError(f"{_rel(path)} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise CourseError(f"{_rel(path)} line {i}: each line must be a JSON object")
        out.append((i, rec))
    if not out:
        raise CourseError(f"{_rel(path)} has no records")
    return out


class _Checker:
    """Field checks that name the file, the line, the record id and the field."""

    def __init__(self, path: Path, line: int, rec: dict):
        self.where = f"{_rel(path)} line {line}" + (f" (id '{rec['id']}')" if isinstance(rec.get("id"), str) else "")
        self.rec = rec

    def fail(self, field: str, msg: str):
        raise CourseError(f"{self.where}: field '{field}' {msg}")

    def string(self, obj: dict, field: str, required: bool = True, allow_empty: bool = False, label=None):
        label = label or field
        if field not in obj or obj[field] is None:
            if required:
                self.fail(label, "is missing")
            return None
        v = obj[field]
        if not isinstance(v, str) or (not allow_empty and not v.strip()):
            self.fail(label, "must be a non-empty string" if not allow_empty else "must be a string")
        return v

    def probes(self, obj: dict, field: str, need_target: bool = True, required: bool = False):
        v = obj.get(field, [])
        if v is None:
            v = []
        if not isinstance(v, list):
            self.fail(field, "must be a list of probes")
        if required and not v:
            self.fail(field, "must have at least one probe")
        for j, p in enumerate(v):
            if not isinstance(p, dict):
                self.fail(f"{field}[{j}]", "must be an object with 'question' (and 'target')")
            self.string(p, "question", label=f"{field}[{j}].question")
            self.string(p, "prefix", required=False, allow_empty=True, label=f"{field}[{j}].prefix")
            self.string(p, "target", required=need_target, label=f"{field}[{j}].target")
        return v


def records_with_ids(name: str | Path):
    """Yield ``(checker, record)`` for each record of a JSONL file whose ``id`` is present and unique.

    The one loop every validated course data file starts with; the caller checks the other fields
    with ``checker.string(...)`` / ``checker.fail(...)`` so errors name the file, line, id and field."""
    path = data_path(str(name))
    seen: set[str] = set()
    for line, rec in read_jsonl(path):
        c = _Checker(path, line, rec)
        rid = c.string(rec, "id")
        if rid in seen:
            c.fail("id", f"'{rid}' is used twice")
        seen.add(rid)
        yield c, rec


def load_edits(name: str | Path = "edits.jsonl") -> list[dict]:
    """Edit requests (schema in data/README.md), validated; ids must be unique."""
    edits = []
    for c, rec in records_with_ids(name):
        c.string(rec, "subject")
        c.string(rec, "question")
        c.string(rec, "prefix", required=False, allow_empty=True)
        c.string(rec, "target_new")
        c.string(rec, "target_true", required=False)
        c.string(rec, "note")
        c.probes(rec, "rephrase", need_target=False, required=True)
        c.probes(rec, "reversal")
        c.probes(rec, "portability")
        c.probes(rec, "locality", required=True)
        edits.append(rec)
    return edits


def load_probes(name: str | Path) -> list[dict]:
    """A plain probe file: records with 'question', optional 'prefix', and 'target' (optional: 'id')."""
    path = data_path(str(name))
    out = []
    for line, rec in read_jsonl(path):
        c = _Checker(path, line, rec)
        c.string(rec, "question")
        c.string(rec, "prefix", required=False, allow_empty=True)
        c.string(rec, "target", required=False)
        out.append(rec)
    return out


# ------------------------------------------------------------------ fields of a JSON data object

def field_fail(path, field: str, msg: str):
    """One-line error naming a JSON data file and the field that is wrong."""
    raise CourseError(f"{_rel(data_path(str(path)))}: field '{field}' {msg}")


def field_strings(path, obj: dict, field: str, min_len: int = 1) -> list[str]:
    v = obj.get(field)
    if not isinstance(v, list) or len(v) < min_len or not all(isinstance(s, str) and s.strip() for s in v):
        field_fail(path, field, f"must be a list of at least {min_len} non-empty strings")
    return v


def field_string(path, obj: dict, field: str) -> str:
    v = obj.get(field)
    if not isinstance(v, str) or not v.strip():
        field_fail(path, field, "must be a non-empty string")
    return v


def field_pairs(path, obj, field: str, keys=("question", "answer"), min_len: int = 1) -> list[dict]:
    v = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(v, list) or len(v) < min_len:
        field_fail(path, field, f"must be a list of at least {min_len} objects with {', '.join(keys)}")
    for j, p in enumerate(v):
        if not isinstance(p, dict):
            field_fail(path, f"{field}[{j}]", f"must be an object with {', '.join(keys)}")
        for k in keys:
            if not isinstance(p.get(k), str) or not p[k].strip():
                field_fail(path, f"{field}[{j}].{k}", "must be a non-empty string")
    return v


def load_json(name: str | Path, required_keys: tuple[str, ...] = ()) -> dict:
    """A JSON object file with the given top-level keys."""
    path = data_path(str(name))
    if not path.exists():
        raise CourseError(f"data file {_rel(path)} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CourseError(f"{_rel(path)}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise CourseError(f"{_rel(path)}: must hold a JSON object")
    for k in required_keys:
        if k not in obj:
            raise CourseError(f"{_rel(path)}: field '{k}' is missing")
    return obj
