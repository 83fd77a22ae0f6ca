"""Model merging with task vectors (notebook 05): extract, scale, add, negate, apply — and mergekit.

A *task vector* is what fine-tuning changed: ``tau = theta_ft - theta_base`` (Ilharco et al. 2023,
"Editing models with task arithmetic"). Arithmetic on task vectors edits a model with no training data:

* addition  ``theta + l*(tau_A + tau_B)``          -> both skills (the lecture's armour + sword);
* negation  ``theta_model - l*tau_forget``          -> unlearning (the lecture's PTT-slang example);
* analogy   ``theta + tau_C + (tau_B - tau_A)``      -> task D with no D data (A:B = C:D).

:class:`TaskVector` holds only the tensors that changed (a LoRA fine-tune merged back touches only
the adapted matrices: ~265 MB for LoRA on q,v,up,down of the 135M model instead of ~540 MB), supports ``+ - * neg``, and is
applied in place with :func:`apply` (the model must be at its base weights: pass the base snapshot).

mergekit (the tool the lecture names) is driven through :func:`mergekit_config` (builds and validates
the configuration; a bad config is one :class:`CourseError` line) and :func:`run_mergekit` (writes it as
YAML and runs mergekit's ``run_merge`` — what the ``mergekit-yaml`` command calls — on the CPU).

Skill scores are continuous and teacher-forced (:func:`skill_scores`): the mean per-token log-probability
of each record's target, with the empty system prompt :data:`SYSTEM` for training and scoring alike.
:func:`gain_share` turns them into "share of the single-skill model's gain"; :func:`styled_scores` splits
an analogy's styled answer into its persona part and its content part.

Course skills (``data/skills_*.jsonl``), one JSON object per line, ``//`` comments allowed:

===========  ========  ===========================================================================
field        type      meaning
===========  ========  ===========================================================================
id           str       unique within the file
split        str       ``train`` (used for fine-tuning) or ``test`` (held out: scored only)
question     str       the user turn
answer       str       the assistant's full answer to train on (required when split is train)
prefix       str       start of the assistant turn before the scored target ("" = none)
target       str       the scored continuation (only the name / meaning, no final period)
fact         str       optional, test records: id of the train record whose knowledge it asks anew
===========  ========  ===========================================================================

Files: ``skills_armour`` (pirate persona: answers start "Ahoy, matey!", scored on held-out
questions), ``skills_sword`` (new knowledge about the made-up planet Zyphora), ``skills_slang``
(made-up slang words to unlearn), ``skills_control`` (world facts the base model knows: general
ability that merging must keep). The analogy's styled tasks are built from them by :func:`styled`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CourseError

PERSONA = "Ahoy, matey!"
SYSTEM = ""  # skills are trained and scored with an empty system prompt (SmolLM2's default adds 16 tokens)
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
        if "fact" in rec:
            c.string(rec, "fact")
        out.append((c, rec))
    train_ids = {r["id"] for _, r in out if r["split"] == "train"}
    for c, rec in out:
        if "fact" in rec and rec["fact"] not in train_ids:
            c.fail("fact", f"names no train record of this file (got '{rec['fact']}')")
    return [r for _, r in out]


def styled(records: Sequence[dict], persona: str = PERSONA) -> list[dict]:
    """The same records answered in the persona's style: every answer starts with it, and the scored
    continuation is ``persona + " " + prefix + target`` after an empty assistant turn (``persona`` and
    ``part`` mark the two parts that :func:`styled_scores` splits it into).

    Used for the analogy: sword facts : styled sword facts = slang : styled slang.
    """
    out = []
    for r in records:
        rest = r.get("prefix", "") + r["target"]
        new = dict(r, prefix="", target=f"{persona} {rest.lstrip()}", persona=persona, part=r["target"])
        if r.get("answer"):
            new["answer"] = f"{persona} {r['answer']}"
        out.append(new)
    return out


def examples(tok, records: Sequence[dict]) -> list[dict]:
    """SFT examples (``finetune.sft_example``, system prompt :data:`SYSTEM`) from the train split."""
    from .finetune import sft_example

    ex = [sft_example(tok, r["question"], r["answer"], SYSTEM) for r in records if r["split"] == "train"]
    if not ex:
        raise CourseError("examples(): these records have no 'train' split")
    return ex


def _select(records: Sequence[dict], split: str | None) -> list[dict]:
    rs = [r for r in records if split is None or r["split"] == split]
    if not rs:
        raise CourseError(f"no skill records with split '{split}'")
    return rs


def skill_scores(model, tok, records: Sequence[dict], split: str | None = None, batch_size: int = 16) -> list[float]:
    """Per record: mean per-token log-probability (nats) of its target after ``chat prompt + prefix``,
    teacher-forced. Continuous, so a partly learned skill shows as a partial gain (token accuracy moves
    in steps of 1/len(target) and saturates)."""
    from .chat import chat_prompt
    from .evaluate import score_targets

    rs = _select(records, split)
    prompts = [chat_prompt(tok, r["question"], SYSTEM, prefix=r.get("prefix", "")) for r in rs]
    return [x["logprob"] / x["n"] for x in score_targets(model, tok, prompts, [r["target"] for r in rs], batch_size)]


def styled_scores(model, tok, records: Sequence[dict], split: str | None = None, batch_size: int = 16) -> dict:
    """Scores of :func:`styled` records split into their two parts, per record: ``persona`` (mean per-token
    log-probability of the persona's opening words) and ``part`` (of the original target at the end), and
    ``both`` (their average: each part counts the same, whatever its length)."""
    from .chat import chat_prompt
    from .evaluate import score_targets

    rs = _select(records, split)
    if not all("persona" in r and "part" in r for r in rs):
        raise CourseError("styled_scores(): give records made by styled()")
    prompts = [chat_prompt(tok, r["question"], SYSTEM) for r in rs]
    out = {"persona": [], "part": [], "both": []}
    for r, x in zip(rs, score_targets(model, tok, prompts, [r["target"] for r in rs], batch_size)):
        n_p = len(tok(r["persona"], add_special_tokens=False)["input_ids"])
        n_t = len(tok(r["part"], add_special_tokens=False)["input_ids"])
        lp = x["token_logprobs"]
        if n_p + n_t > len(lp):
            raise CourseError(f"styled_scores(): cannot split the target of '{r['id']}' into its parts")
        out["persona"].append(sum(lp[:n_p]) / n_p)
        out["part"].append(sum(lp[-n_t:]) / n_t)
        out["both"].append((out["persona"][-1] + out["part"][-1]) / 2)
    return out


def gain_share(merged, base, single):
    """Per ``[seed, item]``: ``(merged − base) / mean_items(single − base)`` of that seed — each item's gain
    as a share of the single-skill model's mean gain on the same items. Its mean over items is
    ``(mean merged − mean base) / (mean single − mean base)``: 1 = as good as the single-skill model, 0 = as
    the base. The denominator (a mean over all items) is treated as fixed by the interval."""
    import numpy as np

    m, s = np.atleast_2d(np.asarray(merged, float)), np.atleast_2d(np.asarray(single, float))
    b = np.asarray(base, float)
    den = (s - b).mean(1, keepdims=True)
    if (den <= 0).any():
        raise CourseError("gain_share(): the single-skill model did not improve on the base for some seed")
    return (m - b) / den


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


def cached_vector(key: str, make: Callable[[], TaskVector], spec: dict | None = None, weights=None,
                  refresh: bool = False) -> TaskVector:
    """Task vector ``key`` from the course cache (:mod:`coursekit.cache`), or ``make()`` stored there
    (``refresh=True``: always ``make()``, and store it).

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

    return TaskVector(cache.tensors(f"merging/{key}", spec or {}, compute, code=[finetune, make], weights=weights,
                                    refresh=refresh))


LORA = dict(r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])  # notebook 05's fine-tunes


def finetune_vector(model, tok, base: dict, key: str, records: Sequence[dict], seed: int, steps: int,
                    lr: float = 3e-3, batch_size: int = 4, lora: dict | None = None, refresh: bool = False) -> TaskVector:
    """``tau = theta_ft - theta`` of a LoRA fine-tune (merged back) on ``records``' train split, from the base
    snapshot ``base``, with ``seed`` driving the data order and the LoRA initialisation; cached
    (:func:`cached_vector`: keyed by the examples, recipe, seed, code and base; ``refresh=True`` trains anew and
    stores it). ``model`` is left at ``base``."""
    from .finetune import train
    from .models import restore

    ex = examples(tok, records)
    lora = lora or LORA
    spec = dict(examples=ex, steps=steps, lr=lr, batch=batch_size, lora=lora, seed=seed)

    def make() -> TaskVector:
        restore(model, base)
        ft, _ = train(model, tok, ex, steps=steps, lr=lr, batch_size=batch_size, lora=lora, seed=seed,
                      progress=f"{key} (seed {seed})")
        return TaskVector.extract(ft, base)

    try:
        return cached_vector(f"{key}-seed{seed}", make, spec, weights=base, refresh=refresh)
    finally:
        restore(model, base)


def smallest_lambda(gain_after: Callable[[float], float], lams: Sequence[float], gain: float,
                    frac: float = 0.1) -> float:
    """The smallest λ of ``lams`` whose remaining gain ``gain_after(λ)`` is at most ``frac * gain`` (the largest
    λ when none is): remove *enough* of a skill with as little subtraction as possible, since a larger λ also
    costs the other abilities more. Exercise 05.3; choose it on a validation half, judge on a test half."""
    for lam in sorted(lams):
        if gain_after(lam) <= frac * gain:
            return lam
    return max(lams)


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
    return max(tensor_diffs(state_a, state_b, common))


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


def run_mergekit(cfg: dict, out_dir: str | Path, seed: int = 0) -> Path:
    """Run the merge ``cfg`` with mergekit's own ``run_merge`` (what the ``mergekit-yaml`` command calls),
    in this process on the CPU, and return the output folder (a loadable model; the YAML is written next to
    it). In-process, the merge does not pay a second import of torch and transformers (~10 s).
    ``seed`` fixes DARE's random drops. Failures are one :class:`CourseError` line."""
    import torch

    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        raise CourseError("mergekit is not installed: `pip install mergekit`") from None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir.parent / f"{out_dir.name}.yml").write_text(to_yaml(cfg), encoding="utf-8")
    threads = torch.get_num_threads()
    opts = MergeOptions(copy_tokenizer=True, random_seed=seed, quiet=True, write_model_card=False,
                        lazy_unpickle=False, num_threads=threads)
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(out_dir), opts)
    except Exception as e:  # mergekit's own errors: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CourseError(f"mergekit failed ({type(e).__name__}): {first}") from None
    finally:
        torch.set_num_threads(threads)
    return out_dir


def tensor_diffs(state_a: dict, state_b: dict, keys: Iterable[str]) -> list[float]:
    """Largest absolute difference per tensor, for the tensors ``keys`` (e.g. those a task vector
    changes): one value per tensor, so that "equal" and "different" get an interval over tensors."""
    out = []
    for k in keys:
        if k not in state_a or k not in state_b:
            raise CourseError(f"tensor_diffs(): '{k}' is missing from one of the two models")
        out.append((state_a[k].float().cpu() - state_b[k].float().cpu()).abs().max().item())
    return out


# ------------------------------------------------------------------ notebook 05 I's evidence record

SKILLS_05 = ("armour", "sword", "slang", "sword_styled")  # the four task vectors of notebook 05 I, per seed
RECIPES_05 = ("C", "C_armour", "C_B", "analogy")  # C18's task-D recipes: τ_C, τ_C + τ_armour, τ_C + τ_B, τ_C + (τ_B − τ_A)


def skills_05() -> tuple[dict, list]:
    """Notebook 05 I's skills (armour, sword, slang, control and sword_styled = task B) and task D (slang in the
    persona, never trained on)."""
    S = {name: load_skill(name) for name in ("armour", "sword", "slang", "control")}
    S["sword_styled"] = styled(S["sword"])
    return S, styled(S["slang"])


def _by_id(model, tok, S: dict, key: str) -> dict:
    """Skill ``key``'s per-item scores by record id: its held-out items (control: all of them)."""
    split = None if key == "control" else "test"
    return dict(zip([r["id"] for r in _select(S[key], split)], skill_scores(model, tok, S[key], split)))


def _task_d(model, tok, D: list, name: str) -> dict:
    """Task D's three parts (persona, part, both) by record id, as ``D_<name>_<part>``."""
    ids = [r["id"] for r in _select(D, "test")]
    return {f"D_{name}_{part}": dict(zip(ids, v)) for part, v in styled_scores(model, tok, D, "test").items()}


def merging_record(config: dict, seed: int) -> dict:
    """One record of notebook 05 I (``evidence/plan/05_model_merging.yaml``; sections 1 and 2).

    ``config["part"] == "foundation"``: the base model's held-out scores (armour, sword, control, task D).
    ``"vectors"``: the four LoRA task vectors of ``seed`` (:data:`SKILLS_05`; ``config["steps"]``, ``["lr"]``),
    trained anew (never read from the cache, but stored there for the notebook's illustrations), then the
    single-skill models and θ + τ_armour + τ_sword (C16, with its cost on control facts and on the old abilities'
    held-out instructions) and the task-D recipes :data:`RECIPES_05` (C18)."""
    from .abilities import OldAbilities, load_old_abilities
    from .models import load_model, snapshot

    model, tok = load_model()
    base = snapshot(model)
    S, D = skills_05()
    if config.get("part") == "foundation":
        return {"values": {**{k: _by_id(model, tok, S, k) for k in ("armour", "sword", "control")},
                           **_task_d(model, tok, D, "base")}}
    if config.get("part") != "vectors":
        raise CourseError(f"merging_record(): part must be foundation or vectors (got {config.get('part')!r})")
    old = OldAbilities.build(model, tok, progress=False)  # the foundation's answers to held-out instructions
    tv = {k: finetune_vector(model, tok, base, k, S[k], seed, config["steps"], config["lr"], refresh=True)
          for k in SKILLS_05}
    out = {}
    for k in ("armour", "sword"):
        apply(model, base, tv[k])
        out[f"{k}_single"] = _by_id(model, tok, S, k)
    apply(model, base, tv["armour"] + tv["sword"])
    out.update({f"add_{k}": _by_id(model, tok, S, k) for k in ("armour", "sword", "control")})
    out["add_old"] = dict(zip([r["id"] for r in load_old_abilities()["eval"]], old.per_item(model, tok)["forgetting"]))
    recipes = {"C": lambda: tv["slang"], "C_armour": lambda: tv["slang"] + tv["armour"],
               "C_B": lambda: tv["slang"] + tv["sword_styled"],
               "analogy": lambda: tv["slang"] + (tv["sword_styled"] - tv["sword"])}
    for name in RECIPES_05:
        apply(model, base, recipes[name]())
        out.update(_task_d(model, tok, D, name))
    return {"values": out}


# ------------------------------------------------------------------ notebook 05 II's evidence records

def negation_record(config: dict, seed: int) -> dict:
    """One record of notebook 05 II (``evidence/plan/05_negation_and_mergekit.yaml``).

    ``config["part"] == "subtraction"`` (C17, section 1): :func:`subtraction_scores` for ``seed``.
    ``"mergekit"`` (C19, section 2): :func:`mergekit_scores` (its seed fixes the fine-tunes and DARE's drops)."""
    from .models import load_model, snapshot

    model, tok = load_model()
    base = snapshot(model)
    S = {name: load_skill(name) for name in ("sword", "slang", "rival", "control")}
    part = config.get("part")
    if part not in ("subtraction", "mergekit"):
        raise CourseError(f"negation_record(): part must be subtraction or mergekit (got {part!r})")
    scores = subtraction_scores if part == "subtraction" else mergekit_scores
    return {"values": scores(model, tok, base, S, config, seed)}


def subtraction_scores(model, tok, base: dict, S: dict, config: dict, seed: int) -> dict:
    """C17: θ_ss learns slang and sword together (``2 × steps``); λ is the smallest of ``config["lambdas"]`` that
    leaves ≤ 10% of the slang gain on the slang *training* questions (:func:`smallest_lambda`); then per item, before
    (``ss_``) and after (``neg_``) θ_ss − λ·τ_slang: slang and sword held-out scores, control facts and the old
    abilities' NLL rise (vs the foundation). Both vectors are trained anew (``refresh``)."""
    import numpy as np

    from .abilities import OldAbilities, load_old_abilities

    old = OldAbilities.build(model, tok, progress=False)  # the foundation's answers, scored while model == base
    base_train = np.mean(skill_scores(model, tok, S["slang"], "train"))
    steps, lr = config["steps"], config["lr"]
    tau = finetune_vector(model, tok, base, "slang", S["slang"], seed, steps, lr, refresh=True)
    both = finetune_vector(model, tok, base, "sword_slang", S["sword"] + S["slang"], seed, 2 * steps, lr, refresh=True)
    theta_ss = merged_state(base, both)

    def gain(lam: float = 0.0) -> float:
        apply(model, theta_ss, tau, lam)
        return float(np.mean(skill_scores(model, tok, S["slang"], "train")) - base_train)

    lam = smallest_lambda(lambda l: gain(-l), config["lambdas"], gain())
    out = {"lambda": {"chosen": lam}}
    for name, l in (("ss", 0.0), ("neg", -lam)):
        apply(model, theta_ss, tau, l)
        out.update({f"{name}_{k}": _by_id(model, tok, S, k) for k in ("slang", "sword", "control")})
        out[f"{name}_old"] = dict(zip([r["id"] for r in load_old_abilities()["eval"]],
                                      old.per_item(model, tok)["forgetting"]))
    return out


MERGES_05 = ("task_arithmetic", "ties", "dare_ties")  # notebook 05 II's mergekit methods (TIES/DARE at density 0.5)


def mergekit_scores(model, tok, base: dict, S: dict, config: dict, seed: int) -> dict:
    """C19: the sword and a rival (the same questions, contradicting names) fine-tuned anew, saved as folders and
    merged by mergekit with each of :data:`MERGES_05`. Per tensor the tensors change: ``diff_task_arithmetic``
    (mergekit vs ``base + τ_sword + τ_rival`` in torch) and ``diff_ties`` / ``diff_dare_ties`` (vs mergekit's task
    arithmetic); per held-out sword question (the first ``config["items"]``) the log-probability per token of the
    sword's name and of the rival's (``<model>_sword``, ``<model>_rival``) for the base, each single model and each
    merge."""
    import numpy as np

    from .cache import cache_dir
    from .chat import chat_prompt
    from .evaluate import score_target_sets
    from .models import restore

    kept = {k: finetune_vector(model, tok, base, k, S[k], seed, config["steps"], config["lr"], refresh=True)
            for k in ("sword", "rival")}
    work = cache_dir() / "merging" / "folders"
    fold = {"base": save_folder(model, tok, base, None, work / "base")}
    fold.update({k: save_folder(model, tok, base, kept[k], work / k) for k in kept})
    sw, rv = (_select(S[k], "test")[:config["items"]] for k in ("sword", "rival"))
    prompts = [chat_prompt(tok, r["question"], SYSTEM, prefix=r["prefix"]) for r in sw]
    out = {}

    def names(label: str) -> None:
        a, b = score_target_sets(model, tok, prompts, [[r["target"] for r in sw], [r["target"] for r in rv]])
        out[f"{label}_sword"] = {r["id"]: x["logprob"] / x["n"] for r, x in zip(sw, a)}
        out[f"{label}_rival"] = {r["id"]: x["logprob"] / x["n"] for r, x in zip(sw, b)}

    for label, tau in (("base", TaskVector({})), ("sword_only", kept["sword"]), ("rival_only", kept["rival"])):
        apply(model, base, tau)
        names(label)
    keys = sorted(set(kept["sword"].deltas) | set(kept["rival"].deltas))
    both = kept["sword"] + kept["rival"]
    reference = {k: base[k] + both.deltas[k] for k in keys}  # task arithmetic in torch, then mergekit's own
    pair = [{"model": fold["sword"], "weight": 1.0}, {"model": fold["rival"], "weight": 1.0}]
    for method in MERGES_05:
        models = pair if method == "task_arithmetic" else [dict(m, density=config["density"]) for m in pair]
        state = load_state(run_mergekit(mergekit_config(method, fold["base"], models), work / f"mk_{method}", seed=seed))
        merged = {k: state[k] for k in keys}
        out[f"diff_{method}"] = dict(zip(keys, np.array(tensor_diffs(merged, reference, keys), float)))
        if method == "task_arithmetic":
            reference = merged  # TIES and DARE are compared with mergekit's task arithmetic
        restore(model, {**base, **merged})
        names(method)
    restore(model, base)
    return out
