"""The install files agree with each other, and the README's commands exist."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_same_dependencies_as_pyproject():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in proj["dependencies"] + proj["optional-dependencies"]["dev"]}
    env = (ROOT / "environment.yml").read_text()
    pip_lines = [l.strip()[2:].strip() for l in env.splitlines() if l.strip().startswith("- ") and l.startswith("      ")]
    got = {_name(r): r.replace(" ", "") for r in pip_lines if not r.startswith(("-", "."))}
    assert got == wanted, f"environment.yml and pyproject.toml differ: {set(got.items()) ^ set(wanted.items())}"


def test_readme_commands_exist_in_makefile():
    mk = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    for target in ("course", "test", "lab"):
        assert re.search(rf"^{target}:", mk, re.M), f"Makefile lacks '{target}'"
        assert f"make {target}" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_every_notebook_records_results_and_has_checked_cells():
    import json

    for nb_path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        nb = json.loads(nb_path.read_text())
        src = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        assert any("ck.record(" in s for s in src), f"{nb_path.name} never calls ck.record"
        checked = [s for s in src if s.lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
        assert checked and all("assert" in s for s in checked), f"{nb_path.name}: checked cells need asserts"
        assert "colab.research.google.com" in "".join("".join(c["source"]) for c in nb["cells"]), nb_path.name
