"""Exercises: the checks pass on the solutions and fail, with a clear message, on the student blanks.

Runs every exercise found in notebooks/ (nbgrader markers), so a notebook change that breaks an
exercise fails CI. Also checks that each check *diagnoses* the usual mistakes in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import coursekit as ck
from coursekit import assignments
from coursekit.checks import CheckFailed

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _cases():
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        for e in assignments.exercises(nb, p.name):
            yield pytest.param(p, e, id=f"{p.stem}:{e['id']}")


def _run(cell_src: str, check_src: str):
    ns = {"ck": ck}
    exec(compile(cell_src, "<exercise>", "exec"), ns)
    exec(compile(check_src, "<check>", "exec"), ns)


@pytest.mark.parametrize("path,ex", list(_cases()))
def test_check_passes_on_solution_and_fails_on_student_version(path, ex, capsys):
    nb = json.loads(path.read_text())
    src = assignments._src(nb["cells"][ex["cell"]])
    check = "\n".join(l for l in assignments._src(nb["cells"][ex["check_cell"]]).splitlines() if "ck.checks.check_" in l)
    _run(src, check)
    assert "✓" in capsys.readouterr().out
    student = assignments.student_version(nb, path.name)
    ssrc = assignments._src(student["cells"][ex["cell"]])
    assert "### BEGIN SOLUTION" not in ssrc and "NotImplementedError" in ssrc
    with pytest.raises(CheckFailed, match="not implemented yet"):
        _run(ssrc, check)


def test_topic_notebooks_have_at_least_two_exercises():
    for p in NOTEBOOKS:
        if p.name.startswith("00_"):
            continue
        n = len(assignments.exercises(json.loads(p.read_text()), p.name))
        assert n >= 2, f"{p.name} has {n} exercises (need >= 2)"


def test_build_writes_student_and_solution(tmp_path):
    rows = assignments.build(ROOT / "notebooks", tmp_path)
    assert rows, "no exercises found"
    for r in rows:
        s = json.loads((tmp_path / "student" / r["notebook"]).read_text())
        assert all(not c.get("outputs") for c in s["cells"] if c["cell_type"] == "code")
        assert "### BEGIN SOLUTION" not in json.dumps(s)
    assert "| tier |" in (tmp_path / "README.md").read_text()


def test_marker_errors_are_one_line():
    nb = {"cells": [{"cell_type": "code", "source": "def f():\n    ### BEGIN SOLUTION\n    return 1\n", "outputs": []}]}
    with pytest.raises(ck.CourseError, match="header line"):
        assignments.exercises(nb, "x.ipynb")


# --- each check diagnoses the classic mistakes with one line ---------------------------------
def _fails(check, fn, needle):
    with pytest.raises(CheckFailed) as e:
        check(fn)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_diagnoses():
    import torch
    import torch.nn.functional as F

    c = ck.checks
    _fails(c.check_token_accuracy, lambda p, t: sum(a == b for a, b in zip(p, t)), "divide")
    _fails(c.check_locality, lambda r, n: 1 - sum(sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(r, n)) / len(r), "CHANGED")
    _fails(c.check_completion_loss, lambda lg, lb: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100), "shift")
    _fails(c.check_dpo_loss, lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pr - rr) - (pc - rc))), "flipped")
    _fails(c.check_rank_one_update, lambda W, k, v, C: W + torch.outer(v - W @ k, k) / (k @ k), "C = I")
    _fails(c.check_task_vector, lambda ft, base: {k: base[k] - ft[k] for k in base}, "sign flipped")
    _fails(c.check_apply_task_vectors, lambda base, taus, lams: {k: base[k] + sum(t[k] for t in taus) for k in base}, "λ")
    _fails(c.check_entropy_loss, lambda lg: (lg.softmax(-1) * lg.log_softmax(-1)).sum(-1).mean(), "minus sign")
    _fails(c.check_covariance, lambda K: torch.cov(K.T), "UNCENTRED")
    _fails(c.check_mcc_loss, lambda lg, T: torch.tensor(0.0), "expected")
    _fails(c.check_task_vector, 3, "pass the function")


def test_reference_implementations_pass(capsys):
    import torch.nn.functional as F

    from coursekit import forgetting, rome, ttt

    c = ck.checks
    c.check_completion_loss(lambda lg, lb: F.cross_entropy(lg[:, :-1].flatten(0, 1), lb[:, 1:].flatten(), ignore_index=-100))
    c.check_dpo_loss(forgetting.dpo_loss)
    c.check_rank_one_update(rome.rank_one_update)
    c.check_entropy_loss(ttt.entropy_loss)
    c.check_mcc_loss(ttt.mcc_loss)
    assert capsys.readouterr().out.count("✓") == 5
