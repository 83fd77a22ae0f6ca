"""Model merging with task vectors (notebook 05): extract, scale, add, negate, apply — and mergekit.

A *task vector* is what fine-tuning changed: ``tau = theta_ft - theta_base`` (Ilharco et al. 2023,
"Editing models with task arithmetic"). Arithmetic on task vectors edits a model with no training data:

* addition  ``theta + l*(tau_A + tau_B)``          -> both skills (the lecture's armour + sword);
* negation  ``theta_model - l*tau_forget``          -> unlearning (the lecture's PTT-slang example);
* analogy   ``theta + tau_C + (tau_B - tau_A)``      -> task D with no D data (A:B = C:D).

:class:`TaskVector` holds only the tensors that changed (a LoRA fine-tune merged back touches only
the adapted matrices: ~265 MB for LoRA on q,v,up,down of the 135M model instead of ~540 MB), supports ``+ - * neg``, and is
applied in place with :func:`apply` (the model must be at its base weights: pass the base snapshot).

mergekit (the tool the lecture names) is driven through :func:`mergekit_config` (writes and validates
the YAML; a bad config is one :class:`CourseError` line) and :func:`run_mergekit` (runs the
``mergekit-yaml`` CLI that sits next to ``sys.executable``, on the CPU).

Course skills (``data/skills_*.jsonl``), one JSON object per line, ``//`` comments allowed:

===========  ========  ===========================================================================
field        type      meaning
===========  ========  ===========================================================================
id           str       unique within the file
split        str       ``train`` (used for fine-tuning and scored) or ``test`` (scored only)
question     str       the user turn
answer       str       the assistant's full answer to train on (required when split is train)
prefix       str       start of the assistant turn before the scored target ("" = none)
target       str       the scored continuation (teacher-forced token accuracy)
===========  ========  ===========================================================================

Files: ``skills_armour`` (pirate persona: answers start "Ahoy, matey!", scored on held-out
questions), ``skills_sword`` (new knowledge about the made-up planet Zyphora), ``skills_slang``
(made-up slang words to unlearn), ``skills_control`` (world facts the base model knows: general
ability that merging must keep). The analogy's styled tasks are built from them by :func:`styled`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CourseError

PERSONA = "Ahoy, matey!"
SPLITS = ("train", "test")
METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")


# ------------------------------------------------------------------ course skills (data)

def load_skill(name: str) -> list[dict]:
    """Records of ``data/skills_<name>.jsonl`` (or a path), validated (see the module docstring)."""
    from .data import records_with_ids

    out = []
    for c, rec in records_with_ids(name if name.endswith(".jsonl") else f"skills_{name}.jsonl"):
        split = c.string(rec, "split")
        if split not in SPLITS:
            c.fail("split", f"must be one of {SPLITS} (got '{split}')")
        c.string(rec, "question")
        c.string(rec, "answer", required=split == "train")
        c.string(rec, "prefix", required=False, allow_empty=True)
        c.string(rec, "target")
        out.append(rec)
    return out


def styled(records: Sequence[dict], persona: str = PERSONA) -> list[dict]:
    """The same records answered in the persona's style: answer and scored target both start with it.

    Used for the analogy: sword facts : styled sword facts = slang : styled slang.
    """
    out = []
    for r in records:
        full = r.get("answer") or (r.get("prefix", "") + r["target"])
        out.append(dict(r, answer=f"{persona} {full}", prefix="", target=f"{persona} {full}"))
    return out


def examples(tok, records: Sequence[dict]) -> list[dict]:
    """SFT examples (``finetune.sft_example``) from the train split."""
    from .finetune import sft_example

    ex = [sft_example(tok, r["question"], r["answer"]) for r in records if r["split"] == "train"]
    if not ex:
        raise CourseError("examples(): these records have no 'train' split")
    return ex


def skill_score(model, tok, records: Sequence[dict], split: str | None = None, batch_size: int = 16) -> float:
    """Teacher-forced token accuracy of each record's target after ``chat prompt + prefix``."""
    from .chat import chat_prompt
    from .evaluate import token_accuracy

    rs = [r for r in records if split is None or r["split"] == split]
    if not rs:
        raise CourseError(f"skill_score(): no records with split '{split}'")
    prompts = [chat_prompt(tok, r["question"], prefix=r.get("prefix", "")) for r in rs]
    return token_accuracy(model, tok, prompts, [r["target"] for r in rs], batch_size)


# ------------------------------------------------------------------ task vectors

def _float_state(model_or_state) -> dict:
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return {k: v for k, v in state.items() if v.is_floating_point()}


class TaskVector:
    """``tau = theta_ft - theta_base`` as a dict of tensors; keys absent = zero change.

    ``TaskVector.extract(ft_model, base_snapshot)``; arithmetic: ``a + b``, ``a - b``, ``-a``,
    ``0.5 * a``; ``apply(model, base, tau)`` writes ``base + tau`` into ``model``.
    """

    def __init__(self, deltas: dict):
        self.deltas = dict(deltas)

    @classmethod
    def extract(cls, finetuned, base, atol: float = 0.0) -> "TaskVector":
        """Difference of a fine-tuned model (or state dict) and the base state dict; tensors whose
        change is at most ``atol`` everywhere are left out (they are exactly zero after LoRA)."""
        ft, b = _float_state(finetuned), _float_state(base)
        missing = [k for k in ft if k not in b]
        if missing:
            raise CourseError(f"TaskVector.extract(): base lacks {len(missing)} weights (e.g. {missing[0]}); "
                              f"were both taken from the same architecture (and not a peft-wrapped model)?")
        out = {}
        for k, v in ft.items():
            if v.shape != b[k].shape:
                raise CourseError(f"TaskVector.extract(): '{k}' has shape {tuple(v.shape)} but the base has "
                                  f"{tuple(b[k].shape)}")
            d = v.detach().float().cpu() - b[k].detach().float().cpu()
            if d.abs().max().item() > atol:
                out[k] = d
        return cls(out)

    # arithmetic ---------------------------------------------------------
    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        out = {k: v.clone() for k, v in self.deltas.items()}
        for k, v in other.deltas.items():
            if k in out:
                if out[k].shape != v.shape:
                    raise CourseError(f"task vectors disagree on the shape of '{k}': are they from the same base?")
                out[k] = out[k] + sign * v
            else:
                out[k] = sign * v
        return TaskVector(out)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __radd__(self, other):  # sum([...]) starts from 0
        return self if other == 0 else self.__add__(other)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __mul__(self, lam: float):
        return TaskVector({k: float(lam) * v for k, v in self.deltas.items()})

    __rmul__ = __mul__

    # inspection ---------------------------------------------------------
    def norm(self) -> float:
        return float(sum((v.double() ** 2).sum() for v in self.deltas.values()) ** 0.5)

    def numel(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    def cosine(self, other: "TaskVector") -> float:
        """Cosine similarity of two task vectors (flattened): ~0 means they barely interfere."""
        dot = sum((v.double() * other.deltas[k].double()).sum() for k, v in self.deltas.items() if k in other.deltas)
        n = self.norm() * other.norm()
        return float(dot / n) if n else 0.0

    def __repr__(self):
        return f"TaskVector({len(self.deltas)} tensors, {self.numel():,} numbers, norm {self.norm():.3f})"

    # storage ------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskVector":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise CourseError(f"task vector file {path} not found")
        try:
            return cls(load_file(str(path)))
        except Exception as e:  # corrupt or not a safetensors file
            raise CourseError(f"could not read task vector {path} ({type(e).__name__}); delete it to rebuild") from None


def merged_state(base: dict, tau: TaskVector, lam: float = 1.0) -> dict:
    """``base + lam * tau`` as a new state dict (tensors not in tau are shared with base)."""
    out = dict(base)
    for k, v in tau.deltas.items():
        if k not in base:
            raise CourseError(f"the task vector changes '{k}', which the base model does not have")
        out[k] = base[k] + lam * v.to(base[k].dtype).to(base[k].device)
    return out


def apply(model, base: dict, tau: TaskVector, lam: float = 1.0):
    """Write ``base + lam * tau`` into ``model`` in place (every weight, so the model need not be at
    ``base`` beforehand) and return it. ``base`` is a snapshot (``models.snapshot``)."""
    from .models import restore

    restore(model, merged_state(base, tau, lam))
    return model


def cached_vector(key: str, make: Callable[[], TaskVector], spec: dict | None = None, weights=None) -> TaskVector:
    """Task vector ``key`` from the course cache (:mod:`coursekit.cache`), or ``make()`` stored there.

    The entry is keyed by ``spec`` (the training recipe: data, steps, lr, ...), the source of ``make`` and
    of the fine-tuning and merging code, the library versions and ``weights`` (the base model or snapshot
    the vector starts from), so a changed recipe, code or base rebuilds the vector instead of reusing a
    stale one.
    """
    from . import cache, finetune

    if not isinstance(key, str) or not key:
        raise CourseError(f"cached_vector(): key must be a non-empty string (got {key!r})")

    def compute() -> dict:
        tau = make()
        if not isinstance(tau, TaskVector) or not tau.deltas:
            raise CourseError(f"cached_vector({key!r}): make() must return a non-empty TaskVector")
        return tau.deltas

    return TaskVector(cache.tensors(f"merging/{key}", spec or {}, compute, code=[finetune, make], weights=weights))


def save_folder(model, tok, base: dict, tau: TaskVector | None, folder: str | Path, lam: float = 1.0) -> Path:
    """Save ``base + lam*tau`` as a safetensors model folder (for mergekit); the model is left at
    those weights. With ``tau=None`` the base itself is saved."""
    from .models import save_model

    apply(model, base, tau if tau is not None else TaskVector({}), lam)
    return save_model(model, tok, folder)


def load_state(folder: str | Path) -> dict:
    """All tensors of a saved model folder (``*.safetensors``), without building a model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CourseError(f"{folder} has no .safetensors files: is it a saved model folder?")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def max_abs_diff(state_a: dict, state_b: dict) -> float:
    """Largest absolute difference over the float tensors the two state dicts share (at least one)."""
    common = [k for k in state_a if k in state_b and state_a[k].is_floating_point()]
    if not common:
        raise CourseError("max_abs_diff(): the two models share no weight names")
    return max((state_a[k].float().cpu() - state_b[k].float().cpu()).abs().max().item() for k in common)


# ------------------------------------------------------------------ mergekit

def mergekit_config(method: str, base_model: str | Path, models: Sequence[dict], normalize: bool = False,
                    lam: float = 1.0, dtype: str = "float32", extra: dict | None = None) -> dict:
    """A validated mergekit configuration (a dict; :func:`run_mergekit` writes it as YAML).

    ``models``: ``[{"model": folder, "weight": w, "density": d}, ...]`` (density only for
    ties/dare). Negative weights subtract a task vector; they need ``normalize=False``.
    """
    if method not in METHODS:
        raise CourseError(f"mergekit: unknown merge_method '{method}'; use one of {', '.join(METHODS)}")
    if not models:
        raise CourseError("mergekit: 'models' must list at least one fine-tuned model folder")
    if normalize and any(float(m.get("weight", 1.0)) < 0 for m in models):
        raise CourseError("mergekit: negative weights (subtraction) need normalize=False")
    folders = [Path(base_model)] + [Path(m["model"]) if isinstance(m, dict) and "model" in m else None
                                    for m in models]
    for i, f in enumerate(folders):
        if f is None:
            raise CourseError(f"mergekit: models[{i - 1}] must be a dict with a 'model' folder")
        if not (f / "config.json").exists():
            raise CourseError(f"mergekit: {f} is not a saved model folder (no config.json); save it with save_folder()")
    entries = []
    for m in models:
        params = {"weight": float(m.get("weight", 1.0))}
        if "density" in m:
            d = float(m["density"])
            if not 0.0 < d <= 1.0:
                raise CourseError(f"mergekit: density must be in (0, 1], got {d}")
            if method == "task_arithmetic":
                raise CourseError("mergekit: 'density' is for ties/dare, not task_arithmetic")
            params["density"] = d
        elif method != "task_arithmetic":
            raise CourseError(f"mergekit: {method} needs a 'density' for every model (fraction of weights kept)")
        entries.append({"model": str(m["model"]), "parameters": params})
    cfg = {"merge_method": method, "base_model": str(base_model), "models": entries,
           "parameters": {"normalize": bool(normalize), "lambda": float(lam)}, "dtype": dtype}
    if extra:
        cfg.update(extra)
    try:  # mergekit's own schema check, reported as one line
        from mergekit.config import MergeConfiguration

        MergeConfiguration.model_validate(cfg)
    except ImportError:
        raise CourseError("mergekit is not installed: `pip install mergekit`") from None
    except Exception as e:
        first = str(e).strip().splitlines()
        raise CourseError(f"mergekit rejected the config: {' '.join(first[:3])}") from None
    return cfg


def to_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def mergekit_cli() -> str:
    """Path of the ``mergekit-yaml`` command next to this Python (the course's virtual env)."""
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if exe.exists():
        return str(exe)
    found = shutil.which("mergekit-yaml")
    if not found:
        raise CourseError("mergekit-yaml not found next to this Python: `pip install mergekit`")
    return found


def run_mergekit(cfg: dict, out_dir: str | Path, seed: int = 0, timeout: int = 600) -> Path:
    """Write ``cfg`` as YAML next to ``out_dir`` and run ``mergekit-yaml`` on the CPU; returns the
    output folder (a loadable model). Failures are one :class:`CourseError` line."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    yml = out_dir.parent / f"{out_dir.name}.yml"
    yml.write_text(to_yaml(cfg), encoding="utf-8")
    cmd = [mergekit_cli(), str(yml), str(out_dir), "--copy-tokenizer", "--quiet", "--random-seed", str(seed),
           "--no-lazy-unpickle"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CourseError(f"mergekit-yaml did not finish in {timeout} s") from None
    if p.returncode != 0:
        lines = [l for l in (p.stderr or p.stdout).strip().splitlines() if l.strip()]
        raise CourseError(f"mergekit-yaml failed (exit {p.returncode}): {lines[-1] if lines else 'no output'}")
    return out_dir
