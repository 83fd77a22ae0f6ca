"""``python -m coursekit.course run``: execute every notebook into build/ and print the results table.

The committed notebooks are never modified. ``python -m coursekit.course table [paths]`` prints the
table from already executed notebooks without running anything.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .results import read_results, results_table

ROOT = Path(__file__).resolve().parent.parent


def notebooks(pattern: str = "*.ipynb") -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob(pattern) if not p.name.startswith("_"))


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
        print(f"{status} ({time.time() - t0:.0f} s, {n} headline numbers)", flush=True)
        done.append((target, status == "ok"))
        if status != "ok":
            print(f"    see {target} for the failing cell", flush=True)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coursekit.course")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks into build/executed and print the table")
    r.add_argument("--pattern", default="*.ipynb")
    r.add_argument("--out", default=str(ROOT / "build" / "executed"))
    r.add_argument("--timeout", type=int, default=1800)
    t = sub.add_parser("table", help="print the results table of executed notebooks")
    t.add_argument("paths", nargs="*")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        done = run(a.pattern, Path(a.out), a.timeout)
        print()
        print(results_table([p for p, _ in done]))
        failed = [p.name for p, ok in done if not ok]
        if failed:
            print(f"\nfailed: {', '.join(failed)}")
        return 1 if failed else 0
    paths = a.paths or [str(p) for p in sorted((ROOT / "build" / "executed").glob("*.ipynb"))]
    print(results_table(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
