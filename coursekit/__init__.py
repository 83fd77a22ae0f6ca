"""coursekit — the reusable code of the lifelong-learning course, one module per lecture topic.

Notebooks import it and *show*; nothing is defined twice.

core:       profile (COURSEKIT_PROFILE), models (load, cache, snapshot/restore), chat (templates,
            batched greedy generation), evaluate (reliability / generality / locality harness and
            forgetting measures), data (validated course data), results (COURSEKIT_RESULT lines),
            seed, errors.
topics:     prompting (00), finetune (01-03), ... one module per notebook topic.
"""
from __future__ import annotations

from .errors import CourseError, install_notebook_handler
from .profile import Profile, get_profile
from .results import record
from .seed import set_seed

__all__ = ["CourseError", "Profile", "get_profile", "record", "set_seed", "setup", "REPO", "colab_url"]
__version__ = "0.1.0"

REPO = "lifelong-llm-course/lifelong-learning-course"  # GitHub owner/name used by the Colab links


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{notebook}"


def setup(seed: int = 0, profile: str | None = None, quiet: bool = True) -> Profile:
    """Start of every notebook: pick the profile, seed everything, make errors one line."""
    import warnings

    install_notebook_handler()
    p = get_profile(profile)
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
