"""LoRA and regularisation against forgetting (notebook 02): the learn-vs-forget frontier.

What lives here (the training loop itself is :func:`coursekit.finetune.train`; LoRA goes through peft):

* two cheap, teacher-forced scores logged at checkpoints — a **new skill** (:class:`NewSkill`: token
  accuracy and loss of short gold answers) and the **old abilities** (the course's shared
  :class:`coursekit.abilities.OldAbilities`: agreement
  with the foundation model's *own* greedy answers to a fixed probe set, and *forgetting*, the rise of
  their cross-entropy over the foundation model's, as in Kalajdzievski 2024);
* the lecture's per-parameter regulariser ``R = Σ_j λ_j (θ_j − θ_j⁰)²`` as a callable for
  ``train(regularizer=)``: uniform ``λ`` (:func:`l2sp`) or importance-weighted ``λ_j ∝ F_j`` (:func:`ewc`),
  with the diagonal Fisher ``F_j`` from the foundation model's own outputs (:func:`diag_fisher`);
* "traditional" regularisers for comparison: dropout on every attention/MLP output (:func:`dropout_hooks`)
  and AdamW weight decay (a ``train()`` argument);
* :func:`run_config` (one fine-tuning configuration -> a list of frontier points), :class:`RunCache`
  (precomputed runs in the course cache, :mod:`coursekit.cache`, for the widget), :func:`pearson`,
  :func:`at_matched` (forgetting interpolated at a given new-skill level).

A configuration is a dict::

    {"name": "LoRA r=8", "method": "full" | "lora", "lr": 1e-3, "r": 8, "targets": ["q_proj", "v_proj"],
     "weight_decay": 0.0, "dropout": 0.0, "reg": None | "l2sp" | "ewc", "lam": 0.0}

Data: the notebook reuses notebook 01's files (``data/forgetting_skills.json`` for the new skill — the
emotion task — and ``data/forgetting_probes.json`` for the old-ability probe questions); this module
adds no data file. Bad input (unknown method, bad rank, mismatched lists, a Fisher from another model)
raises a one-line :class:`CourseError`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

from .abilities import OldAbilities
from .errors import CourseError
from .evaluate import score_targets

METHODS = ("full", "lora")
REGS = (None, "l2sp", "ewc")


# ------------------------------------------------------------------ the two scores

def _nll(rows) -> float:
    """Mean per-token negative log-likelihood over score_targets rows."""
    n = sum(r["n"] for r in rows)
    return -sum(r["logprob"] for r in rows) / max(n, 1)


@dataclass
class NewSkill:
    """The new skill: teacher-forced token accuracy (``skill``) and cross-entropy (``skill_loss``) of
    gold answers. ``NewSkill.from_examples(eval_examples)`` takes ``sft_example`` dicts; the
    completions end with the end-of-turn token, so "answers in one word and stops" is part of the skill."""

    prompts: list
    targets: list

    @classmethod
    def from_examples(cls, examples: Sequence[dict]) -> "NewSkill":
        if not examples:
            raise CourseError("NewSkill needs at least one example")
        for j, e in enumerate(examples):
            if not isinstance(e, dict) or not isinstance(e.get("prompt"), str) or not e.get("completion"):
                raise CourseError(f"NewSkill: example {j} must be a dict with 'prompt' and a non-empty 'completion'")
        return cls(prompts=[e["prompt"] for e in examples], targets=[e["completion"] for e in examples])

    def __call__(self, model, tok) -> dict:
        rows = score_targets(model, tok, self.prompts, self.targets)
        return {"skill": sum(r["acc"] for r in rows) / len(rows), "skill_loss": _nll(rows)}


# ------------------------------------------------------------------ R = Σ_j λ_j (θ_j − θ_j⁰)²

def _check_lam(lam) -> float:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise CourseError(f"the regulariser strength lam must be a number >= 0 (got {lam!r})")
    return float(lam)


def anchor(model) -> dict:
    """θ⁰: a detached copy of every trainable parameter, by name (the foundation weights to stay near)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class ParamPenalty:
    """``R(θ) = lam · Σ_j w_j (θ_j − θ_j⁰)²`` over the parameters named in ``theta0``.

    ``weights`` is None (every ``w_j = 1``: L2-SP) or a dict name -> tensor of the same shape (EWC: the
    diagonal Fisher, normalised to mean 1 so that ``lam`` means the same thing for both). ``w_j`` is
    ``weights[j] / divisor``, divided when the penalty is computed (the same numbers as dividing it all up
    front): the normalised copy lives only until that step's backward, so an EWC run does not hold a
    second model-sized Fisher between steps.
    """

    def __init__(self, theta0: dict, lam: float, weights: dict | None = None, divisor: float = 1.0):
        self.lam = _check_lam(lam)
        if not (isinstance(divisor, (int, float)) and math.isfinite(divisor) and divisor > 0):
            raise CourseError(f"the regulariser's divisor must be a positive number (got {divisor!r})")
        self.divisor = float(divisor)
        if not isinstance(theta0, dict) or not theta0:
            raise CourseError("the regulariser needs theta0: a dict of parameter name -> tensor (use anchor(model))")
        self.theta0 = theta0
        if weights is not None:
            for n, w in weights.items():
                if n not in theta0:
                    raise CourseError(f"regulariser weight '{n}' names no anchored parameter")
                if tuple(w.shape) != tuple(theta0[n].shape):
                    raise CourseError(f"regulariser weight '{n}' has shape {tuple(w.shape)}, "
                                      f"the parameter has {tuple(theta0[n].shape)}")
        self.weights = weights

    def __call__(self, model):
        total = 0.0
        found = 0
        for n, p in model.named_parameters():
            if n not in self.theta0 or not p.requires_grad:
                continue
            if self.weights is not None and n not in self.weights:
                continue
            found += 1
            d = (p - self.theta0[n]) ** 2
            total = total + ((self._weight(n) * d).sum() if self.weights is not None else d.sum())
        if not found:
            raise CourseError("the regulariser found none of its parameters in the model: was theta0 taken "
                              "from a different (or peft-wrapped) model?")
        return self.lam * total

    def _weight(self, name: str):
        import torch

        w = self.weights[name]
        return w if self.divisor == 1.0 else (w / self.divisor).to(torch.float32)


def l2sp(theta0: dict, lam: float) -> ParamPenalty:
    """L2-SP: the same ``λ`` for every parameter — pull everything back towards the foundation weights."""
    return ParamPenalty(theta0, lam, None)


def ewc(theta0: dict, fisher: dict, lam: float) -> ParamPenalty:
    """EWC: ``λ_j = lam · F_j / mean(F)`` — parameters that matter for the old abilities are held harder."""
    if not isinstance(fisher, dict) or not fisher:
        raise CourseError("ewc() needs a non-empty Fisher dict (see diag_fisher())")
    total = sum(f.sum().item() for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if not (total > 0 and math.isfinite(total)):
        raise CourseError("ewc(): the Fisher is all zeros or not finite")
    return ParamPenalty(theta0, lam, fisher, divisor=total / count)


def diag_fisher(model, tok, prompts: Sequence[str], answers: Sequence[str], progress: bool = True) -> dict:
    """Diagonal Fisher ``F_j = mean_i (∂ log p(answer_i | prompt_i) / ∂θ_j)²`` (per example, per token-mean).

    Use the foundation model's *own* answers (e.g. ``OldAbilities.reference``): the labels are what the
    model itself predicts, so this estimates the Fisher of its output distribution on the old abilities,
    without any human-labelled old data. Returns name -> non-negative tensor for every trainable parameter.
    """
    import torch
    from tqdm.auto import tqdm

    if len(prompts) != len(answers) or not prompts:
        raise CourseError(f"diag_fisher(): need as many answers as prompts, at least one "
                          f"(got {len(prompts)} prompts, {len(answers)} answers)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise CourseError("diag_fisher(): the model has no trainable parameters")
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for prompt, ans in tqdm(list(zip(prompts, answers)), desc="Fisher", disable=not progress, leave=False):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(ans, add_special_tokens=False)["input_ids"]
        if not p or not c:
            raise CourseError(f"diag_fisher(): empty prompt or answer ({ans!r})")
        ids = torch.tensor([p + c], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=dev)
        ll = logp[pos, torch.tensor(c, device=dev)].mean()
        model.zero_grad(set_to_none=True)
        ll.backward()
        with torch.no_grad():
            for n, q in params.items():
                if q.grad is not None:
                    fisher[n] += q.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / len(prompts) for n, f in fisher.items()}


# ------------------------------------------------------------------ traditional dropout

@contextmanager
def dropout_hooks(model, p: float):
    """Dropout (rate ``p``, active only in training mode) on the output of every attention and MLP block.

    SmolLM2/Llama has no hidden dropout, so we add it with forward hooks and remove them on exit.
    """
    import torch.nn.functional as F

    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise CourseError(f"dropout rate must be in [0, 1) (got {p!r})")
    handles = []

    def hook(module, inputs, output):
        if not module.training or p == 0:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    for name, m in model.named_modules():
        if name.endswith(".self_attn") or name.endswith(".mlp"):
            handles.append(m.register_forward_hook(hook))
    if p > 0 and not handles:
        raise CourseError("dropout_hooks(): found no '.self_attn' or '.mlp' blocks in this model")
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ one configuration -> frontier points

def check_config(cfg: dict) -> dict:
    """Validate a run configuration (schema in the module docstring) and fill defaults."""
    if not isinstance(cfg, dict):
        raise CourseError(f"a run configuration must be a dict (got {type(cfg).__name__})")
    c = {"method": "full", "r": None, "targets": None, "weight_decay": 0.0, "dropout": 0.0, "reg": None, "lam": 0.0}
    c.update(cfg)
    if not isinstance(c.get("name"), str) or not c["name"]:
        raise CourseError("run configuration needs a non-empty 'name'")
    if c["method"] not in METHODS:
        raise CourseError(f"run '{c['name']}': method must be one of {METHODS} (got {c['method']!r})")
    lr = c.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise CourseError(f"run '{c['name']}': lr must be a positive number (got {lr!r})")
    if c["method"] == "lora":
        if not isinstance(c["r"], int) or isinstance(c["r"], bool) or c["r"] < 1:
            raise CourseError(f"run '{c['name']}': LoRA rank r must be an integer >= 1 (got {c['r']!r})")
        c["targets"] = list(c["targets"] or ("q_proj", "v_proj"))
        if c["reg"] is not None or c["dropout"]:
            raise CourseError(f"run '{c['name']}': regularisers and dropout are only wired for full fine-tuning")
    if c["reg"] not in REGS:
        raise CourseError(f"run '{c['name']}': reg must be one of {REGS} (got {c['reg']!r})")
    _check_lam(c["lam"])
    if not isinstance(c["weight_decay"], (int, float)) or c["weight_decay"] < 0:
        raise CourseError(f"run '{c['name']}': weight_decay must be >= 0")
    if not isinstance(c["dropout"], (int, float)) or not 0 <= c["dropout"] < 1:
        raise CourseError(f"run '{c['name']}': dropout must be in [0, 1)")
    return c


def measure(model, tok, new: NewSkill, old: OldAbilities, train_skill: NewSkill | None = None) -> dict:
    """One frontier point: new-skill score/loss, old-ability agreement/forgetting, and (if given) the
    fine-tuning loss on the whole training set (teacher-forced, no dropout)."""
    out = dict(new(model, tok))
    out.update(old(model, tok))
    if train_skill is not None:
        out["train_loss"] = train_skill(model, tok)["skill_loss"]
    return out


def run_config(model, tok, examples: Sequence[dict], cfg: dict, new: NewSkill, old: OldAbilities,
               steps: int, every: int, snap: dict, batch_size: int = 4, fisher: dict | None = None,
               start: dict | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune from the foundation weights with ``cfg``, log a point every ``every`` steps, then
    restore the foundation weights (``snap``). Returns ``{"config", "points"}``; each point has
    ``step``, ``skill``, ``skill_loss`` (the fine-tuning loss, on held-out examples of the new task),
    ``agreement``, ``forgetting`` and ``batch_loss`` (the training batch's loss at that step). ``start`` (the
    step-0 point, measured once on the foundation model) is prepended when given."""
    from .finetune import train
    from .models import restore

    c = check_config(cfg)
    if steps <= 0 or every <= 0:
        raise CourseError(f"run_config(): steps and every must be positive (got {steps}, {every})")
    if c["reg"] == "ewc" and fisher is None:
        raise CourseError(f"run '{c['name']}': reg 'ewc' needs fisher= (see diag_fisher())")
    restore(model, snap)
    for p in model.parameters():
        p.requires_grad_(True)
    reg = None
    theta0 = {n: snap[n] for n, _ in model.named_parameters()}  # = anchor(model) right after restore, no copy
    if c["reg"] == "l2sp":
        reg = l2sp(theta0, c["lam"])
    elif c["reg"] == "ewc":
        reg = ewc(theta0, fisher, c["lam"])
    points = [dict(start, step=0)] if start else []

    def cb(step, m):
        return measure(m, tok, new, old)

    lora = dict(r=c["r"], target_modules=c["targets"]) if c["method"] == "lora" else None
    try:
        with dropout_hooks(model, c["dropout"]):
            model2, hist = train(model, tok, examples, steps=steps, lr=c["lr"], batch_size=batch_size, lora=lora,
                                 weight_decay=c["weight_decay"], seed=seed, regularizer=reg, callback=cb,
                                 every=every, progress=c["name"] if progress else False)
    finally:
        restore(model, snap)
        for p in model.parameters():
            p.requires_grad_(True)
    for h in hist:
        if "skill" in h:
            pt = {k: h[k] for k in ("step", "skill", "skill_loss", "agreement", "forgetting")}
            pt["batch_loss"] = h["loss"]
            points.append(pt)
    return {"config": c, "points": points}


# ------------------------------------------------------------------ precomputed runs for the widget

class RunCache:
    """Finished runs in the course cache (:mod:`coursekit.cache`), one JSON entry per run, keyed by
    everything that decides it: ``parts`` (configuration, steps, data), the source of this module, of the
    fine-tuning loop and of ``fn``, the library versions and the starting ``weights`` (fingerprinted once,
    here). ``cache.get_or_run(parts, fn)`` returns the stored run or runs ``fn()`` and stores it."""

    def __init__(self, name: str = "runs", weights=None):
        from .cache import fingerprint

        if not name or "/" in name or name.startswith("."):
            raise CourseError(f"RunCache name must be a plain file name (got {name!r})")
        self.name = name
        self.weights = fingerprint(weights) if weights is not None else None

    def get_or_run(self, parts, fn: Callable[[], dict]) -> dict:
        from . import cache, finetune

        return cache.json(f"regularization/{self.name}", list(parts), fn, code=[finetune, RunCache, fn],
                          weights=self.weights)


# ------------------------------------------------------------------ statistics

def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation, written out: cov(x, y) / (std(x) std(y))."""
    if len(x) != len(y) or len(x) < 2:
        raise CourseError(f"pearson(): need two equally long lists of at least 2 numbers (got {len(x)}, {len(y)})")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        raise CourseError("pearson(): one of the lists is constant, the correlation is undefined")
    return sxy / math.sqrt(sxx * syy)


def at_matched(points: Sequence[dict], level: float, x: str = "skill", y: str = "forgetting") -> float | None:
    """``y`` linearly interpolated where the run first reaches ``x == level`` along its checkpoints
    (None if it never gets there)."""
    pts = sorted(points, key=lambda p: p["step"])
    for a, b in zip(pts, pts[1:]):
        if a[x] <= level <= b[x] and b[x] != a[x]:
            t = (level - a[x]) / (b[x] - a[x])
            return a[y] + t * (b[y] - a[y])
        if a[x] == level:
            return a[y]
    if pts and pts[-1][x] == level:
        return pts[-1][y]
    return None
