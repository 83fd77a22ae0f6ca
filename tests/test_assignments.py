"""Exercises: the checks (and the hidden tests) pass on the solutions and fail on the student blanks; the
notebooks carry the nbgrader conventions; student versions show no answer pointer and no internal wording.

Runs every exercise found in notebooks/ (nbgrader markers), on the notebooks as `sync` makes them, so a
notebook change that breaks an exercise fails CI. Also checks that each check *diagnoses* the usual
mistakes in one line. The end-to-end nbgrader pipeline is in test_grading.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import coursekit as ck
from coursekit import assignments
from coursekit.checks import CheckFailed

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = assignments.course_notebooks(ROOT / "notebooks")


def _synced(path: Path) -> dict:
    return assignments.sync_notebook(json.loads(path.read_text()), path.name, ck.REPO)[0]


def _cases():
    for p in NOTEBOOKS:
        for e in assignments.exercises(_synced(p), p.name):
            yield pytest.param(p, e, id=f"{p.stem}:{e['id']}")


def _run(cell_src: str, check_src: str):
    ns = {"ck": ck}
    exec(compile(cell_src, "<exercise>", "exec"), ns)
    exec(compile(check_src, "<check>", "exec"), ns)


def _check_only(src: str) -> str:
    return "\n".join(ln for ln in src.splitlines() if "ck.checks.check_" in ln)


@pytest.mark.parametrize("path,ex", list(_cases()))
def test_check_and_hidden_tests_pass_on_solution_and_fail_on_student_version(path, ex, capsys):
    nb = _synced(path)
    src = assignments._src(nb["cells"][ex["cell"]])
    check_cell = assignments._src(nb["cells"][ex["check_cell"]])
    assert assignments.HIDDEN_BEGIN in check_cell, "sync puts hidden tests into every check cell"
    _run(src, check_cell)  # the visible check and the hidden tests, as nbgrader runs them
    assert "✓" in capsys.readouterr().out
    student = assignments.student_version(json.loads(path.read_text()), path.name)
    ssrc = assignments._src(student["cells"][ex["cell"]])
    assert "### BEGIN SOLUTION" not in ssrc and "NotImplementedError" in ssrc
    scheck = assignments._src(student["cells"][ex["check_cell"]])
    assert "HIDDEN" not in scheck and "ck.checks.check_" in scheck
    with pytest.raises(CheckFailed, match="not implemented yet"):
        _run(ssrc, scheck)
    # the hidden tests alone also reject the blank (a student who replaced ck.checks.check_* gains nothing)
    hidden = assignments.hidden_block(ex["check"])
    with pytest.raises(NotImplementedError):
        _run(ssrc, hidden)


def test_topic_notebooks_have_at_least_two_exercises():
    for p in NOTEBOOKS:
        if p.name.startswith("00_"):
            continue
        n = len(assignments.exercises(json.loads(p.read_text()), p.name))
        assert n >= 2, f"{p.name} has {n} exercises (need >= 2)"


def test_every_check_has_hidden_tests_and_sync_has_nothing_left_to_do_by_hand():
    for p in NOTEBOOKS:
        _, _, todo = assignments.sync_notebook(json.loads(p.read_text()), p.name, ck.REPO)
        assert not todo, f"{p.name}: {todo}"


def test_sync_is_idempotent_and_sets_nbgrader_metadata():
    for p in NOTEBOOKS:
        nb = _synced(p)
        again, changed, _ = assignments.sync_notebook(nb, p.name, ck.REPO)
        assert not changed, f"{p.name}: a second sync still changes {changed}"
        cells = nb["cells"]
        for e in assignments.exercises(nb, p.name):
            sol = cells[e["cell"]]["metadata"]["nbgrader"]
            chk = cells[e["check_cell"]]["metadata"]["nbgrader"]
            assert sol["solution"] and not sol["locked"] and sol["grade_id"] == e["grade_id"]
            assert chk["grade"] and chk["locked"] and chk["points"] == assignments.POINTS[e["tier"]]
        s = assignments.setup_cell(nb)
        assert s is not None and cells[s]["metadata"]["nbgrader"]["locked"], f"{p.name}: no locked setup cell"
        first = next(c for c in cells if c["cell_type"] == "code")
        assert assignments._src(first) == ck.colab.first_cell(ck.REPO), f"{p.name}: the Colab cell is not the first code cell"


def test_notebooks_are_in_sync():
    """Fails until `python -m coursekit.assignments sync notebooks` has been run on the committed notebooks."""
    out = assignments.sync(ROOT / "notebooks", check=True)
    dirty = {name: changed for name, (changed, _) in out.items() if changed}
    assert not dirty, ("notebooks out of sync, run `.venv/bin/python -m coursekit.assignments sync notebooks`: "
                       + "; ".join(f"{n} ({len(c)} changes, e.g. {c[0]})" for n, c in dirty.items()))


def test_student_versions_show_no_answer_pointer_nor_internal_wording():
    for p in NOTEBOOKS:
        student = assignments.student_version(json.loads(p.read_text()), p.name)
        assert not assignments.internal_words(student), f"{p.name}: {assignments.internal_words(student)[:3]}"
        text = json.dumps(student, ensure_ascii=False)
        assert "### BEGIN SOLUTION" not in text and "NBVAL" not in text
        assert all(not c.get("outputs") for c in student["cells"] if c["cell_type"] == "code")


def test_exercise_text_rewrites_remove_the_pointer():
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "**Exercise 09.1 (★).** Write it (it is `coursekit.ttt.entropy_loss`).\n"
                                                           "(`coursekit.x.f` is the version `train()` uses.)"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "# EXERCISE 09.1 (★): f\ndef f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "ck.checks.check_token_accuracy(f)"}]}
    new, _, todo = assignments.sync_notebook(nb, "09_x.ipynb", "a/b")
    assert assignments._src(new["cells"][0]) == "**Exercise 09.1 (★).** Write it."
    assert ck.colab.CELL_TAG in assignments._src(new["cells"][1]), "a notebook without the Colab cell gets one"
    assert not todo


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
    _fails(c.check_smallest_lambda, lambda ga, lams, gain, frac=0.1: max(lams), "smallest")
    _fails(c.check_smallest_lambda, lambda ga, lams, gain, frac=0.1: next((x for x in sorted(lams) if ga(x) <= frac), None),
           "frac * gain")

    def ties_without_trim(taus, density):
        x = torch.stack(taus)
        agree = x.sign() == torch.where(x.sum(0) >= 0, 1.0, -1.0)
        return (x * agree).sum(0) / agree.sum(0).clamp_min(1)

    _fails(c.check_ties_merge, ties_without_trim, "trim")
    _fails(c.check_entropy_loss, lambda lg: (lg.softmax(-1) * lg.log_softmax(-1)).sum(-1).mean(), "minus sign")
    _fails(c.check_covariance, lambda K: torch.cov(K.T), "UNCENTRED")
    _fails(c.check_mcc_loss, lambda lg, T: torch.tensor(0.0), "expected")
    _fails(c.check_training_target, lambda ids, eos: list(ids) + ([] if eos in ids else [eos]), "mid-sentence")
    _fails(c.check_mention_share, lambda answers, name: sum(name in a for a in answers), "expected")
    _fails(c.check_format_validity, lambda texts, key: ck.evaluate.json_rate(texts), "key")
    _fails(c.check_label_margin, lambda lp, gold: lp[gold] - max(lp.values()), "other")
    _fails(c.check_forgetting_at, lambda ls, fs, level: min(zip(ls, fs), key=lambda p: abs(p[0] - level))[1], "nearest")
    _fails(c.check_decay_step, lambda th, th0, lr, wd: th - lr * wd * th, "toward zero")
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


def test_submission_names_find_their_assignment():
    names = ["05_model_merging", "05_negation_and_mergekit", "06_test_time_training"]
    find = assignments._assignment_for
    assert find("05_model_merging (1)", names) == "05_model_merging"
    assert find("05_negation_and_mergekit-copy", names) == "05_negation_and_mergekit"
    assert find("06 my work", names) == "06_test_time_training"
    assert find("05 my work", names) is None  # two assignments share the number: no guess
