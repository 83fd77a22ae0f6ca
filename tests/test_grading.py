"""Grading with nbgrader, end to end, on a small synthetic notebook that follows the course's conventions
(the real notebooks train models for minutes; their exercises are tested in test_assignments.py).

sync -> `nbgrader generate_assignment` -> three submissions -> `nbgrader autograde` -> `nbgrader export` (one CSV
row per student and exercise). The solution scores full marks, the blank 0, and a student who solved one
exercise and printed a fake "✓" for the other (and even edited the locked check cell to print one) gets exactly
the points of the exercise she solved.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coursekit import assignments

ROOT = Path(__file__).resolve().parent.parent
NAME = "09_demo.ipynb"


def _code(src: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}


def _md(src: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": src}


def _source_notebook() -> dict:
    cells = [
        _md("# 09 · A demo notebook\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/someone/old/blob/main/notebooks/09_demo.ipynb)"),
        _code("# NBVAL_IGNORE_OUTPUT\nimport coursekit as ck\nprint('setup')"),
        _code("# NBVAL_IGNORE_OUTPUT\nimport time\ntime.sleep(120)  # a long experiment: grading never runs it"),
        _md("**Exercise 09.1 (★).** Token accuracy. (`coursekit.evaluate` computes exactly this.)"),
        _code("# EXERCISE 09.1 (★): token accuracy\ndef token_accuracy(pred_ids, target_ids):\n"
              "    ### BEGIN SOLUTION\n    return sum(p == t for p, t in zip(pred_ids, target_ids)) / len(target_ids)\n"
              "    ### END SOLUTION"),
        _code("# NBVAL_IGNORE_OUTPUT\nck.checks.check_token_accuracy(token_accuracy)"),
        _md("**Exercise 09.2 (★★).** Locality, averaged over probes."),
        _code("# EXERCISE 09.2 (★★): locality\ndef locality(reference_preds, new_preds):\n    ### BEGIN SOLUTION\n"
              "    per = [sum(a == b for a, b in zip(r, n)) / len(r) for r, n in zip(reference_preds, new_preds)]\n"
              "    return sum(per) / len(per)\n    ### END SOLUTION"),
        _code("# NBVAL_IGNORE_OUTPUT\nck.checks.check_locality(locality)"),
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                         "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def _cell(nb: dict, header: str) -> dict:
    return next(c for c in nb["cells"] if assignments._src(c).startswith(header))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grading")
    src = tmp / "notebooks"
    src.mkdir()
    assignments.write_nb(_source_notebook(), src / NAME)
    assert not assignments.sync(src)[NAME][1], "sync left something to do by hand"
    course = tmp / "course"
    rows = assignments.generate(src, course, repo="teacher/fork")
    assert [(r["id"], r["points"]) for r in rows] == [("09.1", 1), ("09.2", 2)]
    released = json.loads((course / "release" / "09_demo" / NAME).read_text())

    subs = tmp / "submissions"
    # alice hands in the solution itself
    (subs / "alice").mkdir(parents=True)
    assignments.write_nb(json.loads((src / NAME).read_text()), subs / "alice" / NAME)
    # bob hands in the blank, renamed the way a download often is
    (subs / "bob").mkdir()
    assignments.write_nb(released, subs / "bob" / "09_demo (1).ipynb")
    # carol solves 09.1, prints a fake ✓ for 09.2, and rewrites the locked check cell to print one too
    carol = copy.deepcopy(released)
    c1 = _cell(carol, "# EXERCISE 09.1")
    assignments._set_src(c1, assignments._src(c1).replace(
        "# YOUR CODE HERE\n    raise NotImplementedError()",
        "return sum(p == t for p, t in zip(pred_ids, target_ids)) / len(target_ids)"))
    c2 = _cell(carol, "# EXERCISE 09.2")
    assignments._set_src(c2, 'print("✓ locality: 3 checks passed")\n' + assignments._src(c2))
    assignments._set_src(_cell(carol, "ck.checks.check_locality"), 'print("✓ locality: 3 checks passed")')
    (subs / "carol").mkdir()
    assignments.write_nb(carol, subs / "carol" / NAME)

    grades = assignments.grade(subs, course, tmp / "grades.csv")
    return {"course": course, "released": released, "rows": grades, "csv": tmp / "grades.csv", "src": src}


def _score(rows, student, exercise):
    (r,) = [r for r in rows if r["student_id"] == student and r["exercise"] == exercise]
    return float(r["score"]), float(r["max_score"])


def test_release_is_a_clean_student_version(graded):
    nb = graded["released"]
    text = json.dumps(nb, ensure_ascii=False)
    for word in ("BEGIN SOLUTION", "HIDDEN TESTS", "NBVAL", "coursekit.evaluate", "_ht"):
        assert word not in text, word
    assert "raise NotImplementedError()" in assignments._src(_cell(nb, "# EXERCISE 09.1"))
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert '"teacher/fork"' in assignments._src(first), "the Colab cell clones the configured repository"
    assert "colab.research.google.com/github/teacher/fork/blob/main/notebooks/09_demo.ipynb" in assignments._src(nb["cells"][0])
    check = _cell(nb, "ck.checks.check_token_accuracy")["metadata"]["nbgrader"]
    assert check["grade"] and check["locked"] and check["points"] == 1


def test_scores_per_student_and_exercise(graded):
    rows = graded["rows"]
    assert {r["student_id"] for r in rows} == {"alice", "bob", "carol"} and len(rows) == 6
    assert _score(rows, "alice", "09.1") == (1, 1) and _score(rows, "alice", "09.2") == (2, 2)
    assert _score(rows, "bob", "09.1") == (0, 1) and _score(rows, "bob", "09.2") == (0, 2)
    assert _score(rows, "carol", "09.1") == (1, 1), "the solved exercise earns its point"
    assert _score(rows, "carol", "09.2") == (0, 2), "a printed ✓ earns nothing"
    header = graded["csv"].read_text().splitlines()[0]
    assert header == "student_id,assignment,exercise,title,score,max_score,status"
    assert {r["title"] for r in rows} == {"token accuracy", "locality"}


def test_grading_ran_only_the_exercise_cells(graded):
    nb = json.loads((graded["course"] / "autograded" / "alice" / "09_demo" / NAME).read_text())
    long_cell = next(c for c in nb["cells"] if "time.sleep" in assignments._src(c))
    assert not long_cell.get("outputs") and long_cell.get("execution_count") is None
    setup = next(c for c in nb["cells"] if "import coursekit as ck" in assignments._src(c))
    assert any("setup" in "".join(o.get("text", "")) for o in setup["outputs"])


def test_missing_gradebook_is_one_line(tmp_path):
    with pytest.raises(assignments.CourseError, match="make assignments") as e:
        assignments.grade(tmp_path, tmp_path / "nothing")
    assert "\n" not in str(e.value)


def test_make_grade_calls_the_grading_function():
    out = subprocess.run(["make", "-n", "-o", "install", "-o", ".venv/.coursekit-installed", "grade",
                          "SUBMISSIONS=some/folder"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"-m coursekit\.assignments grade .*some/folder", out.stdout), out.stdout
    out = subprocess.run(["make", "-n", "-o", "install", "-o", ".venv/.coursekit-installed", "assignments"],
                         cwd=ROOT, capture_output=True, text=True)
    assert "-m coursekit.assignments generate" in out.stdout, out.stdout


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coursekit.assignments", "grade", str(tmp_path), "--course",
                        str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("CourseError:")
