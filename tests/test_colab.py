"""The notebooks' first cell, run the way Colab runs it.

A fresh virtual environment stands in for a Colab runtime: its "preinstalled" packages are this project's .venv
(a .pth file makes them visible, as Colab's image does with its own), there is a fake ``google.colab`` module,
and the course repository is cloned by the cell itself from a local git repository (a snapshot of this working
tree). After the cell, coursekit is imported from the clone and the course model is loaded. pip runs offline
(everything the course needs is already there, as on Colab for most of it) and without build isolation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import coursekit as ck
from coursekit import colab

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import os, sys, types, json
sys.path.insert(0, os.environ["FAKE_COLAB"])  # google/colab/__init__.py; google/ stays a namespace package
import google.colab  # noqa: F401  (what makes the cell act, as in a Colab kernel)
sys.path.remove(os.environ["FAKE_COLAB"])
cell = open(os.environ["CELL_FILE"], encoding="utf-8").read()
exec(compile(cell, "<first cell>", "exec"), {"__name__": "__main__"})
import coursekit
from coursekit.models import load_model
model, tok = load_model()
print("RESULT " + json.dumps({"coursekit": coursekit.__file__, "cwd": os.getcwd(),
                              "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}))
"""


def _snapshot_repo(dest: Path) -> Path:
    """A git repository holding this working tree's files (tracked and not ignored), like a pushed commit."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes(src.read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "snapshot"], cwd=dest, check=True)
    return dest


def _fresh_venv(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    py = dest / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Colab's preinstalled packages: this project's environment, visible to the new interpreter and to its pip
    (Path(site) / "colab_preinstalled.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return py


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colab")
    repo = _snapshot_repo(tmp / "origin")
    py = _fresh_venv(tmp / "venv")
    cell = tmp / "cell.py"
    cell.write_text(colab.first_cell(ck.REPO), encoding="utf-8")
    (tmp / "driver.py").write_text(DRIVER, encoding="utf-8")
    fake = tmp / "fake_colab" / "google" / "colab"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""A stand-in for Colab\'s google.colab module."""\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COURSEKIT_REPO", "COURSEKIT_HOME"))}
    env.update(COURSEKIT_REPO=f"file://{repo}", COURSEKIT_HOME=str(tmp / "content" / "course"), CELL_FILE=str(cell), FAKE_COLAB=str(tmp / "fake_colab"),
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}")
    return {"tmp": tmp, "py": py, "env": env, "home": tmp / "content" / "course"}


def _run(rt, env=None):
    return subprocess.run([str(rt["py"]), str(rt["tmp"] / "driver.py")], cwd=rt["tmp"], env=env or rt["env"],
                          capture_output=True, text=True, timeout=600)


def _result(r):
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    return json.loads(line[len("RESULT "):])


def test_first_cell_installs_the_course_and_loads_the_model(runtime):
    r = _run(runtime)
    res = _result(r)
    home = runtime["home"].resolve()
    assert Path(res["coursekit"]).resolve().is_relative_to(home), "coursekit must come from the clone"
    assert Path(res["cwd"]).resolve() == home / "notebooks"
    assert res["params"] > 100_000_000 and res["vocab"] > 40_000
    assert "course installed from file://" in r.stdout and "no restart needed" in r.stdout, r.stdout
    # pip installed the course into the fresh environment, and changed nothing that "Colab" shipped
    assert "upgraded" not in r.stdout and "downgraded" not in r.stdout, r.stdout
    # after a restart the same cell finds the install and does not reinstall
    r2 = _run(runtime)
    _result(r2)
    assert "course ready" in r2.stdout and "Installing" not in r2.stdout, r2.stdout


def test_a_failed_clone_is_one_line(runtime, tmp_path):
    """In IPython (Colab's kernel) the cell's error shows as one line, not a traceback."""

    env = dict(runtime["env"], COURSEKIT_REPO=f"file://{tmp_path}/no-such-repo", COURSEKIT_HOME=str(tmp_path / "c"))
    code = ("import sys, types, io, contextlib\n"
            "sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
            "from IPython.core.interactiveshell import InteractiveShell\n"
            "sh = InteractiveShell.instance()\n"
            "res = sh.run_cell(open(sys.argv[1]).read())\n"
            "print('FAILED' if res.error_in_exec else 'OK')\n")
    r = subprocess.run([sys.executable, "-c", code, str(runtime["tmp"] / "cell.py")], env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines[-1] == "FAILED", lines
    errors = [ln for ln in lines[:-1] if "CourseInstallError" in ln]
    assert len(lines) == 2 and len(errors) == 1, lines
    assert "could not clone" in errors[0] and "check the address" in errors[0]


def test_off_colab_the_cell_does_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", colab.first_cell("a/b")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout and not r.stderr and not any(tmp_path.iterdir())


# --- the pieces ------------------------------------------------------------------------------------
def test_repository_location_has_one_source(monkeypatch):
    import importlib

    assert ck.colab_url("05_model_merging.ipynb") == (
        f"https://colab.research.google.com/github/{ck.REPO}/blob/main/notebooks/05_model_merging.ipynb")
    assert f'or "{ck.REPO}"' in colab.first_cell(ck.REPO)
    monkeypatch.setenv("COURSEKIT_REPO", "teacher/fork")
    try:
        importlib.reload(ck)
        assert ck.REPO == "teacher/fork" and ck.repo_url() == "https://github.com/teacher/fork"
        assert "/github/teacher/fork/" in ck.colab_url("00_foundation_model.ipynb")
    finally:
        monkeypatch.delenv("COURSEKIT_REPO")
        importlib.reload(ck)


def test_urls_and_names():
    assert colab.clone_url("a/b") == "https://github.com/a/b"
    assert colab.clone_url("/srv/course.git") == "/srv/course.git"
    assert colab.github_name("https://github.com/a/b.git") == "a/b"
    assert colab.home_name("https://github.com/a/my-course.git") == "my-course"
    with pytest.raises(ck.CourseError, match="not a GitHub repository"):
        colab.github_name("/srv/course.git")


def test_constraints_forbid_downgrades_of_what_is_installed():
    text = colab.no_downgrade_constraints({"torch": "2.5.1+cu121", "ipywidgets": "7.7.1", "coursekit": "0.1.0",
                                           "weird": "not a version"})
    assert text.splitlines() == ["ipywidgets>=7.7.1", "torch>=2.5.1"]


def test_restart_is_needed_only_when_a_loaded_package_changed():
    before = {"transformers": "4.57.1", "ipywidgets": "7.7.1", "numpy": "2.0.2"}
    after = {"transformers": "5.2.0", "ipywidgets": "8.1.7", "numpy": "2.0.2", "gguf": "0.17.1", "coursekit": "0.1.0"}
    ch = colab.changes(before, after)
    assert ch["new"] == ["gguf"] and [n for n, *_ in ch["upgraded"]] == ["ipywidgets", "transformers"]
    owners = {"transformers": {"transformers"}, "ipywidgets": {"ipywidgets"}}
    assert colab.needs_restart(ch, {"transformers", "os"}, owners) == ["transformers"]
    assert colab.needs_restart(ch, {"os"}, owners) == []
    assert "transformers 4.57.1 -> 5.2.0" in colab.summary(ch)
    down = colab.changes({"pydantic": "2.11.0"}, {"pydantic": "2.10.6"})
    assert down["downgraded"] == [("pydantic", "2.11.0", "2.10.6")]


def test_install_errors_render_as_one_line():
    e = colab.ColabInstallError("pip could not install\n the course")
    assert e._render_traceback_() == ["ColabInstallError: pip could not install the course"]
