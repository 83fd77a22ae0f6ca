"""Environment check: one [OK]/[FAIL] line per requirement (``python -m coursekit.envcheck``)."""
from __future__ import annotations

import importlib
import os
import sys

REQUIREMENTS = [
    # (import name, pip name, minimum version or None)
    ("torch", "torch", "2.3"),
    ("transformers", "transformers", "5.0"),
    ("gguf", "gguf", "0.10"),
    ("safetensors", "safetensors", "0.4"),
    ("peft", "peft", "0.17"),
    ("mergekit", "mergekit", "0.1.5"),
    ("sklearn", "scikit-learn", "1.4"),
    ("matplotlib", "matplotlib", "3.8"),
    ("ipywidgets", "ipywidgets", "8.1"),
    ("tqdm", "tqdm", "4.66"),
]


def _ver(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split("."):
        num = "".join(ch for ch in part if ch.isdigit())
        out.append(int(num) if num else 0)
    return tuple(out)


def check(verbose: bool = True) -> dict[str, bool]:
    """Check Python, packages, the course model and the cache; print one line each."""
    results: dict[str, bool] = {}

    def line(ok: bool, name: str, detail: str):
        results[name] = ok
        if verbose:
            print(f"[{'OK' if ok else 'FAIL'}] {name}: {detail}")

    line(sys.version_info >= (3, 10), "python", sys.version.split()[0] + " (need >= 3.10)")
    for mod, pip_name, minimum in REQUIREMENTS:
        try:
            m = importlib.import_module(mod)
            v = getattr(m, "__version__", None)
            if v is None:
                from importlib.metadata import version

                v = version(pip_name)
            ok = minimum is None or _ver(v) >= _ver(minimum)
            line(ok, pip_name, f"{v}" + ("" if ok else f" (need >= {minimum}: pip install -U '{pip_name}>={minimum}')"))
        except Exception as e:  # noqa: BLE001
            line(False, pip_name, f"missing ({type(e).__name__}): pip install '{pip_name}>={minimum}'")
    from .cache import cache_dir
    from .models import PACKAGED, _package_dir
    from .errors import CourseError

    module, gguf, pip_name = PACKAGED["smollm2-135m-instruct"]
    try:
        d = _package_dir(module, pip_name)
        line((d / gguf).exists(), "course model", f"{gguf} in {d}")
    except CourseError as e:
        line(False, "course model", str(e))
    try:
        c = cache_dir()
        probe = c / ".write-test"
        probe.write_text("ok")
        probe.unlink()
        line(True, "cache", f"{c} (writable; set COURSEKIT_CACHE to move it)")
    except OSError as e:
        line(False, "cache", f"not writable ({e}); set COURSEKIT_CACHE to a writable folder")
    try:
        import torch

        n = torch.get_num_threads()
        dev = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else (
            f"cpu ({torch.backends.cpu.get_cpu_capability()} kernels), {n} thread{'s' * (n != 1)}")
        line(True, "device", dev)
    except Exception as e:  # noqa: BLE001
        line(False, "device", str(e))
    from .profile import get_profile

    try:
        p = get_profile()
        line(True, "profile", f"{p.name} ({p.description}); COURSEKIT_PROFILE={os.environ.get('COURSEKIT_PROFILE', '(unset)')}")
    except CourseError as e:
        line(False, "profile", str(e))
    return results


if __name__ == "__main__":
    sys.exit(0 if all(check().values()) else 1)
