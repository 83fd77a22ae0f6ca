"""Student versions of the notebooks, generated from the one notebook CI tests (so they never drift).

Marker convention — nbgrader's, inside a code cell:

    # EXERCISE 05.1 (★): write the task vector τ = θ_ft − θ_base
    def task_vector(ft_state, base_state):
        ### BEGIN SOLUTION
        return {k: ft_state[k] - base_state[k] for k in base_state}
        ### END SOLUTION

and the next code cell calls the check, e.g. ``ck.checks.check_task_vector(task_vector)``.
Tiers: ★ warm-up, ★★ core, ★★★ stretch. Exercise cells hold only imports and definitions, so a
check can run them on their own.

``python -m coursekit.assignments notebooks build/assignments`` writes
``student/NN_*.ipynb`` (solution bodies replaced by ``raise NotImplementedError``, outputs cleared,
checks kept), ``solution/NN_*.ipynb`` (the tested notebooks) and ``README.md`` (the exercise list).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

from .errors import CourseError

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HEADER = re.compile(r"^#\s*EXERCISE\s+(?P<id>[\w.]+)\s*\((?P<tier>★{1,3})\)\s*:\s*(?P<title>.+)$", re.M)


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def exercises(nb: dict, where: str = "notebook") -> list[dict]:
    """The exercises of a notebook: id, tier, title, the solution cell and the check cell after it."""
    cells = nb["cells"]
    out = []
    for i, c in enumerate(cells):
        if c["cell_type"] != "code" or BEGIN not in _src(c):
            continue
        src = _src(c)
        m = HEADER.search(src)
        if not m:
            raise CourseError(f"{where} cell {i}: a solution block needs a header line '# EXERCISE NN.k (★): title'")
        if src.count(BEGIN) != src.count(END):
            raise CourseError(f"{where} cell {i} (exercise {m['id']}): BEGIN/END SOLUTION markers do not pair up")
        check = next((j for j in range(i + 1, len(cells)) if cells[j]["cell_type"] == "code"), None)
        if check is None or "ck.checks.check_" not in _src(cells[check]):
            raise CourseError(f"{where} exercise {m['id']}: the next code cell must call a check (ck.checks.check_...)")
        out.append({"id": m["id"], "tier": m["tier"], "title": m["title"].strip(), "cell": i, "check_cell": check})
    return out


def strip_solution(source: str, exercise_id: str) -> str:
    """Replace every BEGIN/END SOLUTION block with ``raise NotImplementedError`` at the same indent."""
    lines = source.splitlines()
    out, inside = [], False
    for line in lines:
        if line.strip() == BEGIN:
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("exercise {exercise_id}")')
            continue
        if line.strip() == END:
            inside = False
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def student_version(nb: dict, where: str = "notebook") -> dict:
    """A copy of ``nb`` with solutions removed and every output cleared."""
    ex = {e["cell"]: e for e in exercises(nb, where)}
    new = copy.deepcopy(nb)
    for i, c in enumerate(new["cells"]):
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
            if i in ex:
                c["source"] = strip_solution(_src(c), ex[i]["id"])
    new.setdefault("metadata", {})["coursekit"] = {"student_version": True}
    return new


def build(src_dir: Path, out_dir: Path) -> list[dict]:
    rows = []
    for p in sorted(Path(src_dir).glob("[0-9]*.ipynb")):
        nb = json.loads(p.read_text(encoding="utf-8"))
        ex = exercises(nb, p.name)
        if not ex:
            continue
        for d in ("student", "solution"):
            (out_dir / d).mkdir(parents=True, exist_ok=True)
        (out_dir / "student" / p.name).write_text(json.dumps(student_version(nb, p.name), indent=1, ensure_ascii=False), encoding="utf-8")
        (out_dir / "solution" / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
        rows += [dict(e, notebook=p.name) for e in ex]
    lines = ["# Exercises", "", "| notebook | exercise | tier | title |", "|---|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['id']} | {r['tier']} | {r['title']} |" for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coursekit.assignments")
    ap.add_argument("src", nargs="?", default="notebooks")
    ap.add_argument("out", nargs="?", default="build/assignments")
    a = ap.parse_args(argv)
    try:
        rows = build(Path(a.src), Path(a.out))
    except CourseError as e:
        print(f"CourseError: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['notebook']:40s} {r['id']:6s} {r['tier']:4s} {r['title']}")
    print(f"{len(rows)} exercises -> {a.out}/student (hand out), {a.out}/solution (keep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
