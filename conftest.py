"""Repository-wide pytest settings (applies to nbval's notebook items too)."""


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for a cell's queued output messages once the cell has finished; on a busy
    # 2-core machine a cell with progress bars can lag longer than that and fail spuriously.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120


_NOTEBOOK_SECONDS: dict = {}


def pytest_runtest_logreport(report):
    # every phase (setup starts the kernel, call runs the cell) of a notebook's items, summed per notebook
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] = _NOTEBOOK_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """`make test` ends with each notebook's wall time (the 4-minute budget), also written to
    build/timings.json for `python -m coursekit.store timings` (the runtime table)."""
    if not _NOTEBOOK_SECONDS:
        return
    import json
    from pathlib import Path

    path = Path(__file__).parent / "build" / "timings.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        old = {}
    old.update({Path(p).stem: round(s, 1) for p, s in _NOTEBOOK_SECONDS.items()})
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    terminalreporter.section("notebook wall time")
    for path, s in sorted(_NOTEBOOK_SECONDS.items()):
        terminalreporter.write_line(f"{s / 60:5.1f} min  {path}")
    terminalreporter.write_line(f"{sum(_NOTEBOOK_SECONDS.values()) / 60:5.1f} min  all notebooks")
