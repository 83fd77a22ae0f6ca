"""One profile switch: ``COURSEKIT_PROFILE`` picks sizes (steps, eval sets, model), never code paths.

``ci``   — the 2-core CPU that CI runs; committed notebook outputs come from it.
``full`` — a Colab-class GPU: larger sweeps and evaluation sets, same code.

The default is ``full`` when CUDA is present and ``ci`` otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import CourseError

PROFILES: dict[str, dict] = {
    "ci": {"model": "smollm2-135m-instruct", "description": "2-core CPU, minutes per notebook"},
    "full": {"model": "smollm2-135m-instruct", "description": "Colab-class GPU, larger sweeps"},
}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the env check
        return False


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    device: str
    description: str = ""
    extra: dict = field(default_factory=dict)

    def pick(self, **by_profile):
        """Return the value for this profile: ``P.pick(ci=20, full=200)``.

        Every profile must be given, so a notebook cannot silently run a different path.
        """
        missing = [p for p in PROFILES if p not in by_profile]
        unknown = [p for p in by_profile if p not in PROFILES]
        if unknown:
            raise CourseError(f"pick() got unknown profile(s) {unknown}; known: {sorted(PROFILES)}")
        if missing:
            raise CourseError(f"pick() needs a value for every profile; missing {missing}")
        return by_profile[self.name]


def get_profile(name: str | None = None) -> Profile:
    """The active profile: ``name``, else ``$COURSEKIT_PROFILE``, else chosen from the hardware."""
    name = name or os.environ.get("COURSEKIT_PROFILE") or ("full" if _cuda() else "ci")
    name = name.strip().lower()
    if name not in PROFILES:
        raise CourseError(
            f"unknown COURSEKIT_PROFILE '{name}': choose one of {', '.join(sorted(PROFILES))}"
        )
    spec = PROFILES[name]
    device = os.environ.get("COURSEKIT_DEVICE") or ("cuda" if _cuda() else "cpu")
    model = os.environ.get("COURSEKIT_MODEL") or spec["model"]
    return Profile(name=name, model=model, device=device, description=spec["description"])
