"""``python -m coursekit.course run``: execute every notebook into build/, print the results table, each
notebook's wall time and the claims ledger.

The committed notebooks are never modified. Without running anything:
``python -m coursekit.course table [paths]`` prints the results table and
``python -m coursekit.course claims [paths]`` the claims ledger (one row per lecture claim C0..C21) of
executed notebooks (default: build/executed if ``make course`` ran since the notebooks last changed, else the
committed notebooks, which are executed in the ci profile; the first line says which).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .results import read_results, results_table

ROOT = Path(__file__).resolve().parent.parent


def notebooks(pattern: str = "*.ipynb", root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "notebooks").glob(pattern) if not p.name.startswith("_"))


def run(pattern: str, out: Path, timeout: int) -> list[tuple[Path, bool]]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    out.mkdir(parents=True, exist_ok=True)
    done = []
    nbs = notebooks(pattern)
    for i, nb_path in enumerate(nbs, 1):
        t0 = time.time()
        print(f"[{i}/{len(nbs)}] {nb_path.name} ...", end=" ", flush=True)
        nb = nbformat.read(nb_path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(nb_path.parent)}})
        target = out / nb_path.name
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as e:
            status = "FAILED: " + str(e).strip().splitlines()[-1][:200]
        nbformat.write(nb, target)
        n = sum(len(r["metrics"]) for r in read_results(target))
        wall = time.time() - t0
        print(f"{status} ({wall:.0f} s, {n} headline numbers)", flush=True)
        done.append((target, status == "ok", wall))
        if status != "ok":
            print(f"    see {target} for the failing cell", flush=True)
    return done


def default_paths(root: Path = ROOT) -> tuple[list[Path], str]:
    """The notebooks to read and where they come from: build/executed when ``make course`` ran after every notebook
    last changed, else the committed notebooks (a stale build/executed must not hide newer committed results)."""
    committed, out = notebooks(root=root), root / "build" / "executed"
    if not any(out.glob("*.ipynb")):
        return committed, "the committed notebooks (ci profile)"
    stale = [p.name for p in committed if not (out / p.name).exists() or (out / p.name).stat().st_mtime < p.stat().st_mtime]
    if stale:
        which = ", ".join(stale) if len(stale) <= 2 else f"{len(stale)} of them"
        return committed, f"the committed notebooks: build/executed is older than {which} (`make course` refreshes it)"
    return sorted(out.glob("*.ipynb")), "build/executed (the last `make course`)"


def claims_ledger(paths) -> str:
    """The claims ledger from the evidence store; claims no plan holds yet from the notebooks' outputs."""
    from .store import ledger

    return ledger([r for p in paths for r in read_results(p)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coursekit.course")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks into build/executed and print the table")
    r.add_argument("--pattern", default="*.ipynb")
    r.add_argument("--out", default=str(ROOT / "build" / "executed"))
    r.add_argument("--timeout", type=int, default=1800)
    for name, text in (("table", "print the results table of executed notebooks"),
                       ("claims", "print the claims ledger of executed notebooks")):
        sub.add_parser(name, help=text).add_argument("paths", nargs="*")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        done = run(a.pattern, Path(a.out), a.timeout)
        print()
        print(results_table([p for p, _, _ in done]))
        print("\nwall time per notebook")
        for p, ok, wall in done:
            print(f"  {p.name:45s} {wall / 60:5.1f} min{'' if ok else '  FAILED'}")
        print(f"  {'total':45s} {sum(w for _, _, w in done) / 60:5.1f} min")
        print("\nclaims ledger (verdicts from 95% intervals; ../shared/reference/claims.md)")
        print(claims_ledger([p for p, _, _ in done]))
        failed = [p.name for p, ok, _ in done if not ok]
        if failed:
            print(f"\nfailed: {', '.join(failed)}")
        return 1 if failed else 0
    paths = [Path(p) for p in a.paths]
    if not paths:
        paths, source = default_paths()
        print(f"# from {source}")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"CourseError: no such notebook: {', '.join(missing)}")
    print(results_table(paths) if a.cmd == "table" else claims_ledger(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
