"""Headline results: one call per notebook prints a machine-readable line.

``record("00_foundation_model", {"reliability": 0.02})`` prints::

    COURSEKIT_RESULT {"notebook": "00_foundation_model", "profile": "ci", "metrics": {...}}

The results table (``make course``) and any script read these lines back from executed notebooks,
so nothing is re-run to build the table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import CourseError
from .profile import get_profile

MARK = "COURSEKIT_RESULT "


def _clean(v, ndigits: int):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int,)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise CourseError(f"record(): metric value {v!r} is not a number, bool or string")
    if math.isnan(f) or math.isinf(f):
        return None
    return round(f, ndigits)


def record(notebook: str, metrics: dict, ndigits: int = 3, claims=()) -> None:
    """Print the notebook's headline numbers as one ``COURSEKIT_RESULT`` line.

    ``claims``: the notebook's :class:`coursekit.evidence.Claim` objects; they are carried under
    ``"claims"`` (estimate, interval, seeds, items, direction, verdict) for the claims ledger."""
    from .evidence import Claim

    if not isinstance(metrics, dict) or not metrics:
        raise CourseError("record() needs a non-empty dict of metrics")
    if not all(isinstance(c, Claim) for c in claims):
        raise CourseError("record(): claims must be Claim objects (from ck.evidence.claim)")
    payload = {
        "notebook": notebook,
        "profile": get_profile().name,
        "metrics": {str(k): _clean(v, ndigits) for k, v in metrics.items()},
        "claims": [c.to_dict() for c in claims],
    }
    print(MARK + json.dumps(payload, ensure_ascii=False))


def read_results(notebook_path: str | Path) -> list[dict]:
    """All ``COURSEKIT_RESULT`` payloads found in an executed notebook's outputs."""
    nb = json.loads(Path(notebook_path).read_text(encoding="utf-8"))
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            text = out.get("text", "")
            if isinstance(text, list):
                text = "".join(text)
            if not text and "data" in out:
                text = "".join(out["data"].get("text/plain", ""))
            for line in text.splitlines():
                if line.startswith(MARK):
                    found.append(json.loads(line[len(MARK):]))
    return found


def results_table(notebook_paths) -> str:
    """A plain-text table of every notebook's headline metrics."""
    rows = []
    for p in notebook_paths:
        res = read_results(p)
        if not res:
            rows.append((Path(p).stem, "-", "(no recorded results)", ""))
        for r in res:
            for k, v in r["metrics"].items():
                rows.append((r["notebook"], r["profile"], k, "" if v is None else str(v)))
    if not rows:
        return "(no notebooks)"
    w = [max(len(str(r[i])) for r in rows + [("notebook", "profile", "metric", "value")]) for i in range(4)]
    head = ("notebook", "profile", "metric", "value")
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)
