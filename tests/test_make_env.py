"""What each make target hands to the notebooks: CI-only settings stay in test/unit/nbval/course, `make lab` gets
the user's own environment, and `make course` produces executed notebooks with their figures (image/png).

The Makefile's recipes are run for real with PY replaced by a small wrapper (install skipped with -o), so the
environment checked is exactly the one make builds; for `course` the wrapper runs coursekit.course on a
one-cell synthetic notebook that draws a figure (the course notebooks take minutes each).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_ONLY = ["COURSEKIT_PROFILE", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
           "COURSEKIT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND"]

SHIM = """
import json, os, sys
from pathlib import Path
json.dump(dict(os.environ), open(os.environ["ENV_DUMP"], "w"))
if os.environ.get("COURSE_NB") and sys.argv[1:3] == ["-m", "coursekit.course"]:
    import coursekit.course as course
    course.notebooks = lambda pattern="*.ipynb": [Path(os.environ["COURSE_NB"])]
    sys.exit(course.main(["run", "--out", os.environ["COURSE_OUT"]]))
"""


def _make(target: str, tmp: Path, **extra) -> dict:
    shim = tmp / "shim.py"
    shim.write_text(SHIM)
    py = tmp / "py"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{shim}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in CI_ONLY and not k.startswith(("MAKE", "MFLAGS"))}
    env.update(ENV_DUMP=str(tmp / f"env-{target}.json"), **extra)
    r = subprocess.run(["make", "-s", "-o", "install", "-o", ".venv/.coursekit-installed", target, f"PY={py}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((tmp / f"env-{target}.json").read_text())


def test_lab_gets_the_users_environment(tmp_path):
    env = _make("lab", tmp_path)
    leaked = {k: env[k] for k in CI_ONLY if k in env}
    assert not leaked, f"make lab forces CI-only settings: {leaked}"


@pytest.mark.parametrize("target", ["unit", "nbval"])
def test_ci_targets_keep_the_reproducible_settings(target, tmp_path):
    env = _make(target, tmp_path)
    assert env["COURSEKIT_PROFILE"] == "ci" and env["PYTHONHASHSEED"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["COURSEKIT_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["MPLBACKEND"] == "Agg"


def test_course_executes_notebooks_with_their_figures(tmp_path):
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "id": "fig",
                     "source": "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.title('a figure')\nplt.show()"}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    src = tmp_path / "99_figure.ipynb"
    src.write_text(json.dumps(nb))
    out = tmp_path / "executed"
    env = _make("course", tmp_path, COURSE_NB=str(src), COURSE_OUT=str(out), MPLBACKEND="Agg")  # even if the shell says Agg
    assert env["COURSEKIT_PROFILE"] == "ci" and env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    executed = json.loads((out / "99_figure.ipynb").read_text())
    outputs = executed["cells"][0]["outputs"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"no figure in the executed notebook: {outputs}"
