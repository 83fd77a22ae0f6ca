"""Exercises, student versions and grading with nbgrader — generated from the notebooks CI tests.

Convention (nbgrader's markers, inside a code cell)::

    # EXERCISE 05.1 (★): write the task vector τ = θ_ft − θ_base
    def task_vector(ft_state, base_state):
        ### BEGIN SOLUTION
        return {k: ft_state[k] - base_state[k] for k in base_state}
        ### END SOLUTION

and the next code cell calls the check, e.g. ``ck.checks.check_task_vector(task_vector)``. Tiers: ★ warm-up
(1 point), ★★ core (2 points), ★★★ stretch (3 points). Exercise cells hold only imports and definitions, so
a check (and the grader) can run them on their own.

Commands (``python -m coursekit.assignments …``; the Makefile wraps them):

``sync notebooks``
    Brings the notebooks in line with the conventions, idempotently: the first (Colab install) cell from
    ``coursekit.REPO`` (:mod:`coursekit.colab`), the Colab badges, nbgrader cell metadata (solution cells;
    locked check cells with points and hidden tests; the locked setup cell), and exercise text that no
    longer points at the reference implementation nor uses internal wording. ``--check`` only reports.
``generate [notebooks] [build/assignments]``   (``make assignments``)
    An nbgrader course folder: ``source/NN_name/`` (the synced notebook, NBVAL markers removed), then
    ``nbgrader generate_assignment`` writes ``release/NN_name/NN_name.ipynb`` (hand these out) and the
    gradebook.
``grade SUBMISSIONS [--course build/assignments] [--csv build/grades.csv]``   (``make grade``)
    ``SUBMISSIONS/<student>/NN_*.ipynb`` → ``nbgrader autograde`` → ``nbgrader export`` with
    :class:`coursekit.grading.ExerciseCsvExporter`: one CSV row per student and exercise. No Jupyter
    server. Only the cells grading needs run (setup, exercise and check cells; ``--run-all`` runs all).

A check cell that fails (a wrong answer, ``NotImplementedError``, a tampered ``coursekit.checks``) scores 0:
nbgrader restores locked cells from the source before running, so printing "✓" earns nothing.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from .errors import CourseError

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
HEADER = re.compile(r"^#\s*EXERCISE\s+(?P<id>[\w.]+)\s*\((?P<tier>★{1,3})\)\s*:\s*(?P<title>.+)$", re.M)
CHECK_CALL = re.compile(r"ck\.checks\.(?P<check>check_\w+)\(")
POINTS = {"★": 1, "★★": 2, "★★★": 3}
SCHEMA = 3
DEFAULT_COURSE = Path("build/assignments")
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"

# Hidden tests, appended to each check cell (nbgrader removes them from student versions and runs them when
# grading). They state the answer, so students never see them; they compute it independently of
# coursekit.checks, so replacing a check function from a student's cell does not earn the points either.
HIDDEN_TESTS: dict[str, str] = {
    "check_token_accuracy": """
        assert abs(token_accuracy([3, 1, 4, 1, 5], [3, 1, 0, 1, 0]) - 0.6) < 1e-9
    """,
    "check_locality": """
        assert abs(locality([[1, 2], [3, 4, 5, 6]], [[1, 0], [3, 4, 5, 0]]) - 0.625) < 1e-9
    """,
    "check_completion_loss": """
        import torch as _ht
        import torch.nn.functional as _hF
        _hg = _ht.Generator().manual_seed(7)
        _hz, _hy = _ht.randn(3, 5, 7, generator=_hg), _ht.randint(0, 7, (3, 5), generator=_hg)
        _hy[:, :2] = -100
        _hwant = _hF.cross_entropy(_hz[:, :-1].reshape(-1, 7), _hy[:, 1:].reshape(-1), ignore_index=-100)
        assert abs(float(completion_loss(_hz.clone(), _hy.clone())) - float(_hwant)) < 1e-4
    """,
    "check_dpo_loss": """
        import torch as _ht
        import torch.nn.functional as _hF
        _hwant = -_hF.logsigmoid(_ht.tensor(0.3 * ((-2.0 + 3.0) - (-6.0 + 5.0))))
        _hgot = dpo_loss(_ht.tensor(-2.0), _ht.tensor(-6.0), _ht.tensor(-3.0), _ht.tensor(-5.0), 0.3)
        assert abs(float(_hgot) - float(_hwant)) < 1e-5
    """,
    "check_param_penalty": """
        import torch as _ht
        _ha, _hp, _hw = {"w": _ht.tensor([1.0, 2.0])}, {"w": _ht.tensor([2.0, 0.0])}, {"w": _ht.tensor([3.0, 0.25])}
        assert abs(float(param_penalty(_hp, _ha, 2.0)) - 10.0) < 1e-5
        assert abs(float(param_penalty(_hp, _ha, 2.0, _hw)) - 8.0) < 1e-5
    """,
    "check_pearson": """
        assert abs(pearson([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) - 0.8) < 1e-9
    """,
    "check_forgetting_at": """
        assert abs(forgetting_at([4.0, 2.0, 0.0], [0.0, 0.4, 2.0], 1.0) - 1.2) < 1e-9
        assert forgetting_at([4.0, 2.0], [0.0, 0.4], 1.0) is None
    """,
    "check_decay_step": """
        import torch as _ht
        _hgot = decay_step(_ht.tensor([3.0, -1.0]), _ht.tensor([1.0, 1.0]), 0.5, 0.5)
        assert _ht.allclose(_hgot, _ht.tensor([2.5, -0.5]))
    """,
    "check_training_target": """
        assert [int(t) for t in training_target([7, 8, 0, 5], 0)] == [7, 8, 0]
        assert [int(t) for t in training_target([7, 8, 5], 0)] == [7, 8, 5]
    """,
    "check_mention_share": """
        assert abs(mention_share(["Ada Lovelace", "ada", "Grace"], "ADA LOVELACE") - 1 / 3) < 1e-9
    """,
    "check_format_validity": """
        assert abs(format_validity(['{"answer": 1}', 'no', '```json\\n{"answer": 2}\\n```', '{"x": 3}'], "answer") - 0.5) < 1e-9
    """,
    "check_label_margin": """
        assert abs(label_margin({"a": -1.0, "b": -0.25, "c": -4.0}, "a") + 0.75) < 1e-9
    """,
    "check_mix_replay": """
        assert list(mix_replay(["a", "b", "c"], ["x", "y"], 0.5)) == ["a", "b", "c", "x", "y", "x"]
    """,
    "check_token_mask": """
        assert [int(m) for m in token_mask([-0.1, -1.5, -0.9], 3.0)] == [1, 0, 1]
    """,
    "check_covariance": """
        import torch as _ht
        _hK = _ht.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]], dtype=_ht.float64)
        assert _ht.allclose(covariance(_hK.clone()).double(), _hK.T @ _hK / 3)
    """,
    "check_rank_one_update": """
        import torch as _ht
        _hg = _ht.Generator().manual_seed(3)
        _hW, _hk, _hv = (_ht.randn(*s, generator=_hg, dtype=_ht.float64) for s in ((3, 4), (4,), (3,)))
        _hA = _ht.randn(4, 4, generator=_hg, dtype=_ht.float64)
        _hC = _hA @ _hA.T + _ht.eye(4, dtype=_ht.float64)
        _hu = _ht.linalg.solve(_hC, _hk)
        _hgot = rank_one_update(_hW.clone(), _hk.clone(), _hv.clone(), _hC.clone()).double()
        assert _ht.allclose(_hgot, _hW + _ht.outer(_hv - _hW @ _hk, _hu) / (_hu @ _hk), atol=1e-6)
    """,
    "check_drift_kl": """
        import torch as _ht
        _hr = _ht.log_softmax(_ht.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], dtype=_ht.float64), -1)
        _hn = _ht.log_softmax(_ht.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=_ht.float64), -1)
        assert abs(float(drift_kl(_hr.clone(), _hn.clone())) - float((_hr.exp() * (_hr - _hn)).sum(-1).mean())) < 1e-9
    """,
    "check_key_overlap": """
        import torch as _ht
        _hC = _ht.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=_ht.float64)
        assert abs(float(key_overlap(_ht.tensor([1.0, 1.0], dtype=_ht.float64), _ht.tensor([1.0, 0.0], dtype=_ht.float64), _hC)) - 1 / 3) < 1e-9
    """,
    "check_after_two_edits": """
        import torch as _ht
        _hW = _ht.zeros(1, 2, dtype=_ht.float64)
        _hout = after_two_edits(_hW.clone(), _ht.tensor([1.0, 0.0], dtype=_ht.float64), _ht.tensor([1.0], dtype=_ht.float64),
                                _ht.tensor([1.0, 1.0], dtype=_ht.float64), _ht.tensor([3.0], dtype=_ht.float64), _ht.eye(2, dtype=_ht.float64))
        assert _ht.allclose(_hout.double(), _ht.tensor([[2.0, 1.0]], dtype=_ht.float64))
    """,
    "check_most_local_layer": """
        _hrow = lambda e, n: {"efficacy_margin": e, "neighbourhood_margin": n}
        assert most_local_layer({1: [_hrow(1, 2)], 4: [_hrow(-1, 9)], 7: [_hrow(2, 1), _hrow(2, 2)]}) == 1
    """,
    "check_task_vector": """
        import torch as _ht
        _htau = task_vector({"w": _ht.tensor([1.5, 1.0])}, {"w": _ht.tensor([1.0, 2.0])})
        assert _ht.allclose(_htau["w"], _ht.tensor([0.5, -1.0]))
    """,
    "check_apply_task_vectors": """
        import torch as _ht
        _hb = {"w": _ht.tensor([1.0, 1.0])}
        _hout = apply_task_vectors(_hb, [{"w": _ht.tensor([1.0, 0.0])}, {"w": _ht.tensor([0.0, 2.0])}], [2.0, 0.5])
        assert _ht.allclose(_hout["w"], _ht.tensor([3.0, 2.0])) and _ht.allclose(_hb["w"], _ht.tensor([1.0, 1.0]))
    """,
    "check_smallest_lambda": """
        _hl = smallest_lambda(lambda lam: {1.0: 5.0, 3.0: 0.4, 2.0: 0.9, 4.0: 0.0}[lam], [4.0, 2.0, 3.0, 1.0], 5.0)
        assert _hl == 3.0
    """,
    "check_ties_merge": """
        import torch as _ht
        _hd = ties_merge([_ht.tensor([3.0, -1.0, 0.2, 2.0]), _ht.tensor([-1.0, -4.0, 0.1, 2.0])], 0.5)
        assert _ht.allclose(_hd, _ht.tensor([3.0, -4.0, 0.0, 2.0]))
    """,
    "check_entropy_loss": """
        import torch as _ht
        _hz = _ht.tensor([[0.0, 0.0], [0.0, 1.0986123]])
        _hp = _hz.softmax(-1)
        assert abs(float(entropy_loss(_hz.clone())) - float(-(_hp * _hp.log()).sum(-1).mean())) < 1e-5
    """,
    "check_mcc_loss": """
        import torch as _ht
        _hz = 2 * _ht.randn(6, 3, generator=_ht.Generator().manual_seed(5))
        _hy = _ht.softmax(_hz / 2.0, dim=-1)
        _hw = 1 + _ht.exp((_hy * _ht.log(_hy + 1e-12)).sum(-1))
        _hw = 6 * _hw / _hw.sum()
        _hc = (_hy * _hw.unsqueeze(1)).T @ _hy
        _hc = _hc / _hc.sum(1, keepdim=True)
        assert abs(float(mcc_loss(_hz.clone(), 2.0)) - float((_hc.sum() - _ht.trace(_hc)) / 3)) < 1e-5
    """,
}

# Exact rewrites of wording that must not reach students: notes that name the reference implementation an
# exercise is checked against, and words from the project's own tracker. Applied by ``sync``.
REWRITES: list[tuple[str, str]] = [
    ("Write it; the cell below uses\n`coursekit.regularization.pearson`, the same formula.", "Write it."),
    ("# Issue target: locality_heldout >= 0.9.", "# Target: locality_heldout >= 0.9."),
    ("# The issue asked for ≥ 90% of each single-skill score.", "# The target was ≥ 90% of each single-skill score."),
    ("The issue's \"≥ 90% of each", "The target of \"≥ 90% of each"),
]
# "(… `coursekit.x.y` …)" in exercise text: the pointer to the answer, removed with its parentheses.
_REF_PAREN = re.compile(r"[ \t]*\n?[ \t]*\((?:[^()]|\([^()]*\))*?`coursekit\.(?:[^()]|\([^()]*\))*?\)")
_REF = re.compile(r"`coursekit\.[\w.]+`")
INTERNAL = re.compile(r"(?i)\bissue\b|NBVAL|BEGIN SOLUTION|END SOLUTION|HIDDEN TESTS")
_NBVAL_LINE = re.compile(r"^\s*#\s*NBVAL_\w+\s*$")
_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"']+?/notebooks/(?P<nb>[\w.-]+\.ipynb)")


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _set_src(cell, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def _gid(exercise_id: str) -> str:
    return exercise_id.replace(".", "_")


# ------------------------------------------------------------------ reading the convention
def exercises(nb: dict, where: str = "notebook") -> list[dict]:
    """The exercises of a (source) notebook: id, tier, points, title, the solution cell, the check cell after
    it and the check function it calls; nbgrader ids ``ex_NN_k`` (solution) and ``check_NN_k`` (check)."""
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
        call = CHECK_CALL.search(_src(cells[check])) if check is not None else None
        if call is None:
            raise CourseError(f"{where} exercise {m['id']}: the next code cell must call a check (ck.checks.check_...)")
        out.append({"id": m["id"], "tier": m["tier"], "points": POINTS[m["tier"]], "title": m["title"].strip(),
                    "cell": i, "check_cell": check, "check": call["check"],
                    "grade_id": f"ex_{_gid(m['id'])}", "check_id": f"check_{_gid(m['id'])}"})
    ids = [e["id"] for e in out]
    if len(set(ids)) != len(ids):
        raise CourseError(f"{where}: exercise ids repeat ({ids}); each needs its own NN.k")
    return out


def setup_cell(nb: dict) -> int | None:
    """The first code cell that imports coursekit (grading runs it before the exercises)."""
    return next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                 and re.search(r"^\s*import coursekit as ck", _src(c), re.M) and BEGIN not in _src(c)), None)


def _meta(grade_id: str, *, solution=False, grade=False, locked=False, points=None) -> dict:
    m = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": SCHEMA,
         "solution": solution, "task": False}
    if points is not None:
        m["points"] = points
    return m


def hidden_block(check: str) -> str:
    body = textwrap.dedent(HIDDEN_TESTS[check]).strip("\n")
    return f"{HIDDEN_BEGIN}\n{body}\n{HIDDEN_END}"


def _with_hidden(src: str, check: str) -> str:
    block = hidden_block(check)
    if HIDDEN_BEGIN in src:
        return re.sub(re.escape(HIDDEN_BEGIN) + r".*?" + re.escape(HIDDEN_END), lambda _: block, src, flags=re.S)
    return src.rstrip("\n") + "\n" + block


def _exercise_text_cells(nb: dict, exs: list[dict]) -> set[int]:
    """Markdown cells that state an exercise: those naming one, and the one right before each exercise cell."""
    out = {i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown" and re.search(r"\bExercise\b", _src(c))}
    for e in exs:
        j = e["cell"] - 1
        if j >= 0 and nb["cells"][j]["cell_type"] == "markdown":
            out.add(j)
    return out


# ------------------------------------------------------------------ sync (the notebooks' side of the convention)
def sync_notebook(nb: dict, name: str, repo: str | None = None) -> tuple[dict, list[str], list[str]]:
    """``(synced copy, what changed, what still needs a hand edit)``; running it twice changes nothing."""
    from . import REPO
    from .colab import CELL_TAG, first_cell, github_name

    repo = repo or REPO
    nb = copy.deepcopy(nb)
    cells = nb["cells"]
    changed: list[str] = []
    todo: list[str] = []

    def put(i: int, text: str, why: str) -> None:
        if _src(cells[i]) != text:
            _set_src(cells[i], text)
            changed.append(f"cell {i}: {why}")

    # 1. the Colab install cell, generated from coursekit.REPO
    cell = first_cell(repo)
    i = next((k for k, c in enumerate(cells) if c["cell_type"] == "code" and CELL_TAG in _src(c)), None)
    if i is None:
        i = 1 if cells and cells[0]["cell_type"] == "markdown" else 0
        cells.insert(i, {"cell_type": "code", "execution_count": None, "id": "colab-install", "metadata": {},
                         "outputs": [], "source": []})
        changed.append(f"cell {i}: Colab install cell added")
    put(i, cell, "Colab install cell regenerated from coursekit.REPO")

    # 2. Colab badges and links
    gh = github_name(repo)
    for k, c in enumerate(cells):
        if c["cell_type"] == "markdown":
            new = _BADGE.sub(lambda m: f"https://colab.research.google.com/github/{gh}/blob/main/notebooks/{m['nb']}",
                             _src(c))
            put(k, new, "Colab link points at coursekit.REPO")

    # 3. wording that must not reach students
    for k, c in enumerate(cells):
        s = _src(c)
        for old, new in REWRITES:
            s = s.replace(old, new)
        put(k, s, "internal wording reworded")
    exs = exercises(nb, name)
    for k in sorted(_exercise_text_cells(nb, exs)):
        put(k, _REF_PAREN.sub("", _src(cells[k])), "exercise text no longer names the reference implementation")
        for ref in _REF.findall(_src(cells[k])):
            todo.append(f"cell {k}: exercise text still names {ref}; reword it by hand")

    # 4. nbgrader metadata: solution cells, locked check cells with points and hidden tests, the locked setup cell
    want: dict[int, dict] = {}
    s = setup_cell(nb)
    if s is not None:
        want[s] = _meta("setup", locked=True)
    for e in exs:
        want[e["cell"]] = _meta(e["grade_id"], solution=True)
        want[e["check_cell"]] = _meta(e["check_id"], grade=True, locked=True, points=e["points"])
        if e["check"] in HIDDEN_TESTS:
            put(e["check_cell"], _with_hidden(_src(cells[e["check_cell"]]), e["check"]), "hidden tests")
        else:
            todo.append(f"exercise {e['id']}: no hidden test for {e['check']}; add one to "
                        f"coursekit.assignments.HIDDEN_TESTS")
    for k, c in enumerate(cells):
        md = c.setdefault("metadata", {})
        if k in want and md.get("nbgrader") != want[k]:
            md["nbgrader"] = want[k]
            changed.append(f"cell {k}: nbgrader metadata ({want[k]['grade_id']})")
        elif k not in want and "nbgrader" in md:
            del md["nbgrader"]
            changed.append(f"cell {k}: stale nbgrader metadata removed")
    return nb, changed, todo


def read_nb(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CourseError(f"cannot read notebook {path}: {e}") from None


def write_nb(nb: dict, path: Path) -> None:
    """Write as nbformat does (sorted keys, one-space indent), so a sync adds no formatting noise."""
    Path(path).write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def course_notebooks(src_dir: Path) -> list[Path]:
    return sorted(p for p in Path(src_dir).glob("[0-9][0-9]_*.ipynb"))


def sync(src_dir: Path = Path("notebooks"), check: bool = False, repo: str | None = None) -> dict[str, tuple]:
    """Sync every ``NN_*.ipynb`` in ``src_dir`` (write unless ``check``); ``{name: (changes, todo)}``."""
    out = {}
    for p in course_notebooks(src_dir):
        nb = read_nb(p)
        new, changed, todo = sync_notebook(nb, p.name, repo)
        if changed and not check:
            write_nb(new, p)
        out[p.name] = (changed, todo)
    return out


# ------------------------------------------------------------------ what students get
def teacher_source(nb: dict, name: str = "notebook", repo: str | None = None) -> dict:
    """The notebook nbgrader starts from: synced, NBVAL markers removed (students never see CI's bookkeeping)."""
    nb, _, _ = sync_notebook(nb, name, repo)
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            _set_src(c, "\n".join(ln for ln in _src(c).split("\n") if not _NBVAL_LINE.match(ln)))
    return nb


def student_version(nb: dict, where: str = "notebook", repo: str | None = None) -> dict:
    """What ``nbgrader generate_assignment`` hands out, computed in-process (no gradebook): solutions replaced by
    ``raise NotImplementedError()``, hidden tests removed, outputs cleared."""
    import nbformat
    from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions

    node = nbformat.reads(json.dumps(teacher_source(nb, where, repo)), as_version=4)
    resources: dict = {}
    for pp in (ClearSolutions(), ClearHiddenTests(), ClearOutput()):
        node, resources = pp.preprocess(node, resources)
    return json.loads(nbformat.writes(node))


def internal_words(nb: dict) -> list[str]:
    """Cells of a student version that still show internal wording or a pointer to the reference code."""
    exs_text = set()
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "markdown" and re.search(r"\bExercise\b", _src(c)):
            exs_text.add(i)
    out = []
    for i, c in enumerate(nb["cells"]):
        s = _src(c)
        for m in INTERNAL.finditer(s):
            out.append(f"cell {i}: {m.group(0)!r} in {s[max(0, m.start() - 30):m.end() + 30]!r}")
        if i in exs_text:
            out += [f"cell {i}: exercise text names {r}" for r in _REF.findall(s)]
    return out


# ------------------------------------------------------------------ nbgrader: generate, autograde, export
NBGRADER_CONFIG = '''\
# Written by `make assignments` (python -m coursekit.assignments generate); rewritten on every run.
# nbgrader reads it when run in this folder, e.g. `cd {course} && nbgrader autograde 05_model_merging`.
from coursekit.grading import AUTOGRADE_PREPROCESSORS

c = get_config()  # noqa: F821
c.CourseDirectory.course_id = "lifelong-learning-course"
c.ClearSolutions.code_stub = {{"python": {stub!r}}}
# Grading runs the setup, exercise and check cells only (coursekit.grading.ExecuteExercises);
# set c.ExecuteExercises.run_all = True to run every cell as plain nbgrader does (minutes per notebook).
c.Autograde.autograde_preprocessors = AUTOGRADE_PREPROCESSORS
c.Execute.timeout = 600
c.ExportApp.plugin_class = "coursekit.grading.ExerciseCsvExporter"
'''


def _nbgrader(args: list[str], course: Path, quiet: bool = False) -> str:
    """Run ``nbgrader ARGS`` in the course folder (no Jupyter server); one-line CourseError on failure."""
    course = Path(course)
    log = course / "nbgrader.log"
    if not quiet:
        print("$ nbgrader " + " ".join(args), flush=True)
    # nbgrader calls the `alembic` script of its environment: put this interpreter's bin/ first on PATH
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    r = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, capture_output=True, text=True, env=env)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ nbgrader {' '.join(args)}\n{r.stdout}{r.stderr}")
    if r.returncode:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if "ERROR" in ln or "Error" in ln] or lines or ["(no output)"]
        raise CourseError(f"nbgrader {args[0]} failed: {errs[-1][:300]} (full log: {log})")
    return r.stdout + r.stderr


def generate(src_dir: Path = Path("notebooks"), course: Path = DEFAULT_COURSE, only: list[str] | None = None,
             repo: str | None = None) -> list[dict]:
    """Write the nbgrader course folder and run ``nbgrader generate_assignment`` for every notebook with
    exercises. Returns one row per exercise."""
    course = Path(course)
    course.mkdir(parents=True, exist_ok=True)
    (course / "nbgrader_config.py").write_text(NBGRADER_CONFIG.format(course=course, stub=STUB), encoding="utf-8")
    rows = []
    for p in course_notebooks(src_dir):
        if only and p.stem not in only:
            continue
        nb = read_nb(p)
        src = teacher_source(nb, p.name, repo)
        ex = exercises(src, p.name)
        if not ex:
            continue
        aid = p.stem
        d = course / "source" / aid
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        write_nb(src, d / p.name)
        _nbgrader(["generate_assignment", aid, "--force"], course)
        released = read_nb(course / "release" / aid / p.name)
        bad = internal_words(released)
        if bad:
            raise CourseError(f"{course / 'release' / aid / p.name} still shows {bad[0]}; "
                              f"reword the notebook (see coursekit.assignments.REWRITES)")
        rows += [dict(e, notebook=p.name, assignment=aid) for e in ex]
    lines = ["# Exercises", "", "Hand out `release/NN_name/NN_name.ipynb`; keep `source/` and `gradebook.db`.",
             "Grade with `make grade SUBMISSIONS=<folder>` (one sub-folder per student).", "",
             "| notebook | exercise | tier | points | title |", "|---|---|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['id']} | {r['tier']} | {r['points']} | {r['title']} |" for r in rows]
    (course / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def _assignment_for(stem: str, assignments: list[str]) -> str | None:
    """A submitted file's assignment: its own name, else the longest one it starts with (``05_model_merging (1)``),
    else the only one with the same two-digit number."""
    if stem in assignments:
        return stem
    prefixed = sorted((a for a in assignments if stem.startswith(a)), key=len)
    if prefixed:
        return prefixed[-1]
    m = re.match(r"(\d\d)[_ -]", stem)
    hits = [a for a in assignments if m and a.startswith(m.group(1) + "_")]
    return hits[0] if len(hits) == 1 else None


def collect(submissions: Path, course: Path) -> dict[str, list[str]]:
    """Copy ``SUBMISSIONS/<student>/**/NN_*.ipynb`` into nbgrader's ``submitted/<student>/<assignment>/``
    (replacing what an earlier run put there); ``{assignment: [students]}``."""
    submissions, course = Path(submissions), Path(course)
    if not submissions.is_dir():
        raise CourseError(f"SUBMISSIONS={submissions} is not a folder: give a folder with one sub-folder per "
                          f"student, each holding that student's NN_*.ipynb")
    assignments = sorted(p.name for p in (course / "source").iterdir() if p.is_dir())
    for d in ("submitted", "autograded", "feedback"):
        shutil.rmtree(course / d, ignore_errors=True)
    plan: dict[str, list[str]] = {}
    for sdir in sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith(".")):
        student = sdir.name
        for f in sorted(sdir.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in f.parts:
                continue
            aid = _assignment_for(f.stem, assignments)
            if aid is None:
                print(f"  skipped {f} (no assignment matches its name; expected one of {', '.join(assignments)})")
                continue
            dest = course / "submitted" / student / aid / f"{aid}.ipynb"
            if dest.exists():
                raise CourseError(f"{sdir} holds two notebooks for {aid}; keep one")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            plan.setdefault(aid, []).append(student)
    if not plan:
        raise CourseError(f"no submitted notebooks found under {submissions}/<student>/ (expected NN_*.ipynb files)")
    return plan


def grade(submissions: Path, course: Path = DEFAULT_COURSE, csv_path: Path | None = None,
          run_all: bool = False) -> list[dict]:
    """Autograde every submission with nbgrader and export one CSV row per student and exercise."""
    course = Path(course).resolve()
    if not (course / "gradebook.db").exists() or not (course / "source").is_dir():
        raise CourseError(f"{course} has no nbgrader gradebook: run `make assignments` first (it writes the "
                          f"versions you handed out, which grading compares with)")
    csv_path = Path(csv_path or course / "grades.csv").resolve()
    plan = collect(Path(submissions), course)
    students = sorted({s for v in plan.values() for s in v})
    extra = ["--ExecuteExercises.run_all=True"] if run_all else []
    for aid in sorted(plan):
        _nbgrader(["autograde", aid, "--force", *extra], course)
    sel = [f"--ExportPlugin.student={s}" for s in students] + [f"--ExportPlugin.assignment={a}" for a in sorted(plan)]
    _nbgrader(["export", "--to", str(csv_path), *sel], course)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def print_scores(rows: list[dict]) -> None:
    totals: dict[tuple, list[float]] = {}
    for r in rows:
        t = totals.setdefault((r["student_id"], r["assignment"]), [0.0, 0.0])
        t[0] += float(r["score"])
        t[1] += float(r["max_score"])
    for (s, a), (got, most) in sorted(totals.items()):
        print(f"  {s:20s} {a:40s} {got:g} / {most:g}")


# ------------------------------------------------------------------ command line
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"sync", "generate", "grade", "list", "-h", "--help"}:
        argv = ["generate", *argv]  # the old form: python -m coursekit.assignments [notebooks] [out]
    ap = argparse.ArgumentParser(prog="python -m coursekit.assignments")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="bring the notebooks in line with the conventions (idempotent)")
    s.add_argument("src", nargs="?", default="notebooks")
    s.add_argument("--check", action="store_true", help="only report; exit 1 if a notebook is out of sync")
    g = sub.add_parser("generate", help="nbgrader course folder + nbgrader generate_assignment")
    g.add_argument("src", nargs="?", default="notebooks")
    g.add_argument("out", nargs="?", default=str(DEFAULT_COURSE))
    g.add_argument("--only", nargs="*", help="assignment names (notebook stems)")
    r = sub.add_parser("grade", help="nbgrader autograde + export one CSV row per student and exercise")
    r.add_argument("submissions")
    r.add_argument("--course", default=str(DEFAULT_COURSE))
    r.add_argument("--csv", default=None, help="default: <course>/grades.csv")
    r.add_argument("--run-all", action="store_true", help="run every cell of a submission, not only the exercises")
    li = sub.add_parser("list", help="print the exercises")
    li.add_argument("src", nargs="?", default="notebooks")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "sync":
            res = sync(Path(a.src), check=a.check)
            dirty = todo_n = 0
            for name, (changed, todo) in res.items():
                verb = "out of sync" if a.check else "updated"
                if changed:
                    dirty += 1
                    print(f"{name}: {verb} ({len(changed)} changes: {'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})")
                for t in todo:
                    todo_n += 1
                    print(f"{name}: TODO {t}")
            if not dirty and not todo_n:
                print(f"{len(res)} notebooks in sync")
            return 1 if (a.check and dirty) or todo_n else 0
        if a.cmd == "list":
            for p in course_notebooks(Path(a.src)):
                for e in exercises(read_nb(p), p.name):
                    print(f"{p.name:40s} {e['id']:6s} {e['tier']:4s} {e['points']} pt  {e['title']}")
            return 0
        if a.cmd == "generate":
            rows = generate(Path(a.src), Path(a.out), a.only)
            for x in rows:
                print(f"{x['notebook']:40s} {x['id']:6s} {x['tier']:4s} {x['points']} pt  {x['title']}")
            print(f"{len(rows)} exercises -> {a.out}/release (hand out); {a.out}/source and gradebook.db (keep)")
            return 0
        rows = grade(Path(a.submissions), Path(a.course), a.csv, a.run_all)
        print_scores(rows)
        print(f"{len(rows)} rows (student x exercise) -> {a.csv or Path(a.course) / 'grades.csv'}")
        return 0
    except CourseError as e:
        print(f"CourseError: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
