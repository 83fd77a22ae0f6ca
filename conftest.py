"""Repository-wide pytest settings (applies to nbval's notebook items too)."""


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for a cell's queued output messages once the cell has finished; on a busy
    # 2-core machine a cell with progress bars can lag longer than that and fail spuriously.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
