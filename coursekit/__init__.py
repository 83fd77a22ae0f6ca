"""coursekit — the reusable code of the lifelong-learning course, one module per lecture topic.

Notebooks import it and *show*; nothing is defined twice.

core:       profile (COURSEKIT_PROFILE), models (load, cache, snapshot/restore), chat (templates,
            batched greedy generation), evaluate (reliability / generality / locality harness and
            forgetting measures), data (validated course data), results (COURSEKIT_RESULT lines),
            seed, errors.
topics:     prompting (00), finetune (01-03), ... one module per notebook topic.
"""
from __future__ import annotations

import os as _os

from .errors import CourseError, install_notebook_handler
from .profile import Profile, get_profile
from .results import record
from .seed import set_seed

__all__ = ["CourseError", "Profile", "get_profile", "record", "set_seed", "setup", "REPO", "repo_url", "colab_url"]
__version__ = "0.1.0"

# The course's GitHub repository (owner/name): the one source of the Colab badges and of the notebooks' first
# (install) cell, which `python -m coursekit.assignments sync` generates from it. A teacher's fork: set
# COURSEKIT_REPO=owner/name and re-run sync (coursekit.colab explains the cell).
REPO = _os.environ.get("COURSEKIT_REPO", "").strip() or "lifelong-llm-course/lifelong-learning-course"


def repo_url() -> str:
    """Where ``git clone`` finds the course: ``https://github.com/REPO`` (or COURSEKIT_REPO as given when it is
    already a URL or a path)."""
    from .colab import clone_url

    return clone_url(REPO)


def colab_url(notebook: str) -> str:
    """The "Open in Colab" address of ``notebooks/<notebook>`` in REPO (a GitHub owner/name)."""
    from .colab import github_name

    return f"https://colab.research.google.com/github/{github_name(REPO)}/blob/main/notebooks/{notebook}"


def setup(seed: int = 0, profile: str | None = None, quiet: bool = True) -> Profile:
    """Start of every notebook: pick the profile, pin the thread count, seed everything, make errors one line.

    Threads: ``$COURSEKIT_THREADS`` (set to 2 by ``make test`` / ``make course`` / CI) is applied to torch,
    so results are bit-identical run to run; unset (``make lab``, Colab) torch keeps the machine's default.
    """
    import os
    import warnings

    install_notebook_handler()
    p = get_profile(profile)
    threads = os.environ.get("COURSEKIT_THREADS")
    if threads:
        import torch

        if not threads.isdigit() or int(threads) < 1:
            raise CourseError(f"COURSEKIT_THREADS must be a positive integer (got {threads!r})")
        torch.set_num_threads(int(threads))
    set_seed(seed)
    if quiet:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        from .models import _quiet

        _quiet()
    return p


def __getattr__(name: str):
    """Submodules load on first use: ``ck.models``, ``ck.evaluate``, ``ck.finetune``, ``ck.rome``, …"""
    import importlib

    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module 'coursekit' has no attribute or submodule '{name}'") from None
        raise
