"""One kind of error for everything a student can get wrong: a single clear line.

Inside Jupyter, :func:`install_notebook_handler` shows a :class:`CourseError` as one red line
(what went wrong and what to do) instead of a 40-line traceback from inside a library.
"""
from __future__ import annotations

import sys


class CourseError(Exception):
    """A problem with the course's inputs (profile, model, data, config) that the user can fix."""

    def __str__(self) -> str:  # always one line
        return " ".join(str(self.args[0] if self.args else "").split())


def install_notebook_handler() -> None:
    """Make IPython print CourseError as one line. Does nothing outside IPython."""
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return
    if ip is None:
        return

    def _handler(shell, etype, value, tb, tb_offset=None):
        print(f"CourseError: {value}", file=sys.stderr)
        return None

    ip.set_custom_exc((CourseError,), _handler)
