"""LoRA and regularisation against forgetting (notebook 02): the learn-vs-forget frontier.

What lives here (the training loop itself is :func:`coursekit.finetune.train`; LoRA goes through peft):

* :class:`Probe` — the two teacher-forced scores logged at checkpoints, **one value per item** so that
  :mod:`coursekit.evidence` puts intervals on them: *learning* is the fine-tuning loss (the new task's
  cross-entropy on held-out examples, nats/token) and *forgetting* the rise of the cross-entropy of the
  foundation model's own answers to the shared old-ability instructions (:class:`coursekit.abilities.OldAbilities`,
  Kalajdzievski 2024's metric);
* the lecture's per-parameter regulariser ``R = Σ_j λ_j (θ_j − θ_j⁰)²`` as a callable for
  ``train(regularizer=)``: uniform ``λ`` (:func:`l2sp`) or importance-weighted ``λ_j ∝ F_j`` (:func:`ewc`),
  with the diagonal Fisher ``F_j`` from the foundation model's own outputs (:func:`diag_fisher`);
* "traditional" regularisers: dropout on every attention/MLP output (:func:`dropout_hooks`) and AdamW's
  decoupled weight decay, toward zero (as usual) or toward the foundation weights ``θ⁰``
  (``train(decay_toward=)``);
* :func:`run` (one configuration and seed -> checkpoints, cached in the course cache), :func:`frontier_at`
  and :func:`excess` (forgetting over plain fine-tuning **at the same fine-tuning loss**, on the dense
  reference frontier), :func:`pearson`, :func:`spearman`, :func:`correlation_effect`, :func:`choose_lambda`.

A configuration is a dict::

    {"name": "LoRA r=8", "method": "full" | "lora", "lr": 1e-3, "r": 8, "alpha": 8, "rslora": True,
     "targets": ["q_proj", "v_proj"], "weight_decay": 0.0, "decay": "zero" | "start", "dropout": 0.0,
     "reg": None | "l2sp" | "ewc", "lam": 0.0}

Data: the new skill is notebook 01's emotion task (``data/forgetting_skills.json`` trains and its ``task_eval``
plus ``data/forgetting_families.json``'s ``emotion_heldout`` measure); the old abilities are the shared
``data/old_abilities.json`` — its ``fit`` half fits the Fisher and chooses λ, its ``eval`` half measures.
Bad input (unknown method, bad rank, mismatched lists, a Fisher from another model) raises a one-line
:class:`CourseError`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

from .abilities import OldAbilities
from .errors import CourseError
from .evaluate import score_targets

METHODS = ("full", "lora")
REGS = (None, "l2sp", "ewc")
DECAYS = ("zero", "start")
SKETCH_STRIDE = 9973  # every 9973rd weight (a prime: no alignment with rows) — distances between runs


# ------------------------------------------------------------------ the two scores, per item

def emotion_task(tok) -> tuple[list, list]:
    """Notebook 01's narrow task as ``sft_example`` dicts: the 16 training sentences, and 30 held-out ones
    (``task_eval`` of ``data/forgetting_skills.json`` + ``emotion_heldout`` of ``data/forgetting_families.json``;
    the family loader already rejects a held-out sentence that is trained on)."""
    from . import forgetting as fg

    skills, fam = fg.load_skills(), fg.load_families()
    held = (fg.task_examples(tok, skills, "task_eval")
            + fg.task_examples(tok, {**skills, "task_eval": fam["emotion_heldout"]}, "task_eval"))
    return fg.task_examples(tok, skills, "task_train"), held


@dataclass
class Probe:
    """Learning and forgetting, one value per item.

    ``Probe.build(examples, old)`` takes held-out ``sft_example`` dicts of the new task (the completion ends
    with the end-of-turn token, so "answers in one word and stops" is part of the skill) and an
    :class:`OldAbilities`. ``probe.measure(model, tok)`` -> ``{"loss": [...], "forgetting": [...]}``."""

    prompts: list
    targets: list
    old: OldAbilities

    @classmethod
    def build(cls, examples: Sequence[dict], old: OldAbilities) -> "Probe":
        if not examples:
            raise CourseError("Probe needs at least one held-out example of the new task")
        for j, e in enumerate(examples):
            if not isinstance(e, dict) or not isinstance(e.get("prompt"), str) or not e.get("completion"):
                raise CourseError(f"Probe: example {j} must be a dict with 'prompt' and a non-empty 'completion'")
        return cls(prompts=[e["prompt"] for e in examples], targets=[e["completion"] for e in examples], old=old)

    def learning(self, model, tok) -> list:
        """Per held-out example: mean NLL per target token (the fine-tuning loss; lower = learned more)."""
        return [-r["logprob"] / r["n"] for r in score_targets(model, tok, self.prompts, self.targets)]

    def measure(self, model, tok) -> dict:
        return {"loss": self.learning(model, tok), "forgetting": self.old.per_item(model, tok)["forgetting"]}

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



# ------------------------------------------------------------------ one configuration -> checkpoints

def check_config(cfg: dict) -> dict:
    """Validate a run configuration (schema in the module docstring) and fill defaults."""
    if not isinstance(cfg, dict):
        raise CourseError(f"a run configuration must be a dict (got {type(cfg).__name__})")
    c = {"method": "full", "r": None, "alpha": None, "rslora": False, "targets": None, "weight_decay": 0.0,
         "decay": "zero", "dropout": 0.0, "reg": None, "lam": 0.0}
    c.update(cfg)
    if not isinstance(c.get("name"), str) or not c["name"]:
        raise CourseError("run configuration needs a non-empty 'name'")
    name = c["name"]
    if c["method"] not in METHODS:
        raise CourseError(f"run '{name}': method must be one of {METHODS} (got {c['method']!r})")
    lr = c.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise CourseError(f"run '{name}': lr must be a positive number (got {lr!r})")
    if c["method"] == "lora":
        if not isinstance(c["r"], int) or isinstance(c["r"], bool) or c["r"] < 1:
            raise CourseError(f"run '{name}': LoRA rank r must be an integer >= 1 (got {c['r']!r})")
        c["targets"] = list(c["targets"] or ("q_proj", "v_proj"))
        if c["reg"] is not None or c["dropout"] or c["weight_decay"]:
            raise CourseError(f"run '{name}': regularisers, dropout and weight decay are only wired for full "
                              "fine-tuning")
    if c["reg"] not in REGS:
        raise CourseError(f"run '{name}': reg must be one of {REGS} (got {c['reg']!r})")
    _check_lam(c["lam"])
    if not isinstance(c["weight_decay"], (int, float)) or c["weight_decay"] < 0:
        raise CourseError(f"run '{name}': weight_decay must be >= 0")
    if c["decay"] not in DECAYS:
        raise CourseError(f"run '{name}': decay must be one of {DECAYS} (toward zero or toward the start)")
    if not isinstance(c["dropout"], (int, float)) or not 0 <= c["dropout"] < 1:
        raise CourseError(f"run '{name}': dropout must be in [0, 1)")
    return c


def sketch(model, theta0: dict) -> list:
    """``θ − θ⁰`` at every :data:`SKETCH_STRIDE`-th weight (the same positions for every run of a model):
    enough to measure how far apart two runs ended without keeping either model (:func:`distance`)."""
    import torch

    with torch.no_grad():
        parts = [(p.detach() - theta0[n]).reshape(-1)[::SKETCH_STRIDE] for n, p in model.named_parameters()]
    return [round(float(v), 9) for v in torch.cat(parts)]


def distance(a: Sequence[float], b: Sequence[float] | None = None) -> float:
    """Estimated ``‖θ_a − θ_b‖`` over all weights from two :func:`sketch` es (``b=None``: ``‖θ_a − θ⁰‖``)."""
    if b is not None and len(a) != len(b):
        raise CourseError(f"distance(): sketches of different models ({len(a)} vs {len(b)} entries)")
    d2 = sum((x - (b[i] if b is not None else 0.0)) ** 2 for i, x in enumerate(a))
    return math.sqrt(SKETCH_STRIDE * d2)


class Runs:
    """Fine-tuning runs from the foundation weights, each ``(configuration, seed)`` measured by a
    :class:`Probe` at checkpoints and cached in the course cache (:mod:`coursekit.cache`, keyed by the
    configuration, the data, the sizes, the code and the starting weights).

    >>> runs = Runs(model, tok, train_examples, steps=2, batch_size=4, fisher_data=(prompts, answers))
    >>> runs.start(probe)                     # the foundation's scores (step 0), measured once
    >>> runs(cfg, seed=0, probe=probe)        # {"config", "seed", "points": [...], "sketch": [...]}
    """

    def __init__(self, model, tok, examples: Sequence[dict], steps: int, batch_size: int = 4,
                 fisher_data: tuple | None = None, progress: bool = True):
        from . import cache
        from .models import snapshot

        if not examples:
            raise CourseError("Runs: no training examples")
        if not isinstance(steps, int) or steps < 1:
            raise CourseError(f"Runs: steps must be a positive int (got {steps!r})")
        self.model, self.tok, self.examples = model, tok, list(examples)
        self.steps, self.batch_size, self.progress = steps, batch_size, progress
        self.snap = snapshot(model)
        self.weights = cache.fingerprint(self.snap)
        self.fisher_data = fisher_data
        self._fisher = None

    def fisher(self) -> dict:
        """The diagonal Fisher of the foundation on ``fisher_data`` (computed once, only if a run needs it)."""
        from .models import restore

        if self.fisher_data is None:
            raise CourseError("an EWC run needs Runs(fisher_data=(prompts, answers)) (the fit half)")
        if self._fisher is None:
            restore(self.model, self.snap)
            self._fisher = diag_fisher(self.model, self.tok, *self.fisher_data, progress=self.progress)
        return self._fisher

    def _key(self, probe: Probe) -> list:
        return [self.examples, self.steps, self.batch_size, probe.prompts, probe.targets, probe.old.prompts,
                probe.old.answers]

    def start(self, probe: Probe) -> dict:
        """Step 0: the foundation's per-item scores (forgetting is 0 by definition, up to rounding)."""
        from . import cache, finetune
        from .models import restore

        def make():
            restore(self.model, self.snap)
            return dict(probe.measure(self.model, self.tok), step=0)

        return cache.json("regularization/start", self._key(probe), make, code=[finetune.train, OldAbilities],
                          weights=self.weights)

    def __call__(self, cfg: dict, seed: int, probe: Probe, every: int = 1) -> dict:
        from . import cache, finetune

        c = check_config(cfg)
        if not isinstance(every, int) or not 1 <= every <= self.steps:
            raise CourseError(f"Runs: every must be an int in [1, steps={self.steps}] (got {every!r})")
        key = self._key(probe) + [c, seed, every, list(self.fisher_data) if c["reg"] == "ewc" else None]
        return cache.json("regularization/run", key, lambda: self._train(c, seed, probe, every),
                          code=[finetune.train, OldAbilities], weights=self.weights)

    def _train(self, c: dict, seed: int, probe: Probe, every: int) -> dict:
        from .finetune import train
        from .models import restore

        model, snap = self.model, self.snap
        fisher = self.fisher() if c["reg"] == "ewc" else None
        restore(model, snap)
        for p in model.parameters():
            p.requires_grad_(True)
        theta0 = {n: snap[n] for n, _ in model.named_parameters()}  # the foundation weights, no copy
        reg = l2sp(theta0, c["lam"]) if c["reg"] == "l2sp" else ewc(theta0, fisher, c["lam"]) if fisher else None
        lora = (dict(r=c["r"], alpha=c["alpha"], rslora=c["rslora"], target_modules=c["targets"])
                if c["method"] == "lora" else None)
        out: dict = {}
        try:
            with dropout_hooks(model, c["dropout"]):
                model2, hist = train(model, self.tok, self.examples, steps=self.steps, lr=c["lr"],
                                     batch_size=self.batch_size, lora=lora, weight_decay=c["weight_decay"],
                                     decay_toward=theta0 if c["decay"] == "start" else None, seed=seed,
                                     regularizer=reg, every=every, progress=c["name"] if self.progress else False,
                                     callback=lambda step, m: {"scores": probe.measure(m, self.tok)})
            out["sketch"] = sketch(model2, theta0)
        finally:
            restore(model, snap)
            for p in model.parameters():
                p.requires_grad_(True)
        points = [dict(h["scores"], step=h["step"]) for h in hist if "scores" in h]
        return {"config": c, "seed": seed, "points": points, "batch_loss": [h["loss"] for h in hist], **out}


# ------------------------------------------------------------------ matched learning on the dense frontier

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def frontier_at(reference: Sequence[Sequence[dict]], level: float) -> list | None:
    """Per-item forgetting of plain fine-tuning where its mean fine-tuning loss equals ``level``.

    ``reference`` holds the plain runs of one seed (one list of checkpoints per learning rate, step 0
    first). Along each run, the first two consecutive checkpoints whose mean loss brackets ``level`` are
    interpolated linearly, item by item; among the runs that reach ``level``, the one that forgets least
    is the frontier. None when no run gets there (less learning than the start, more than any run)."""
    best = None
    for pts in reference:
        for a, b in zip(pts, pts[1:]):
            la, lb = _mean(a["loss"]), _mean(b["loss"])
            if la == lb or not min(la, lb) <= level <= max(la, lb):
                continue
            t = (level - la) / (lb - la)
            f = [fa + t * (fb - fa) for fa, fb in zip(a["forgetting"], b["forgetting"])]
            if best is None or _mean(f) < _mean(best):
                best = f
            break
    return best


def excess(point: dict, reference: Sequence[Sequence[dict]]) -> list | None:
    """Per item: the point's forgetting minus plain fine-tuning's at the same mean fine-tuning loss
    (:func:`frontier_at`); > 0 = forgets more than the frontier for what it learned. None off the frontier."""
    ref = frontier_at(reference, _mean(point["loss"]))
    return None if ref is None else [x - r for x, r in zip(point["forgetting"], ref)]


def choose_lambda(sweep: dict, start: dict) -> float:
    """The λ (key of ``sweep``: λ -> its run's last checkpoint, measured on the *fit* data) with the least
    forgetting per nat of training loss learned; ``start`` is the same probe on the foundation. Runs that
    learned nothing are skipped. The rule is fixed before any run; it never looks at the eval half."""
    best, best_ratio = None, math.inf
    for lam, end in sweep.items():
        learned = _mean(start["loss"]) - _mean(end["loss"])
        if learned <= 0:
            continue
        ratio = _mean(end["forgetting"]) / learned
        if ratio < best_ratio:
            best, best_ratio = lam, ratio
    if best is None:
        raise CourseError("choose_lambda(): no λ in the sweep learned anything (lower λ or raise the lr)")
    return best


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


def ranks(x: Sequence[float]) -> list:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (monotone, not necessarily linear)."""
    return pearson(ranks(x), ranks(y))


def correlation_effect(name: str, rs: Sequence[float], null: float, points: int, what: str = ""):
    """An :class:`coursekit.evidence.Effect` for one correlation per seed: the t-interval over seeds of
    Fisher's z = atanh(r), mapped back to r (the estimate is tanh of the mean z). The lecture's direction is
    ``less`` (forgetting rises as the fine-tuning loss falls), against ``null`` fixed before the run."""
    from dataclasses import replace

    from .evidence import effect

    if not -1 < null < 1:
        raise CourseError(f"correlation_effect(): null must be in (-1, 1) (got {null!r})")
    zs = [[math.atanh(max(min(r, 1 - 1e-9), -1 + 1e-9))] for r in rs]
    e = effect(name, zs, "less", math.atanh(null), what)
    return replace(e, estimate=math.tanh(e.estimate), low=math.tanh(e.low), high=math.tanh(e.high), null=null,
                   items=points)


def excess_table(method: Sequence[dict], reference: Sequence[Sequence[Sequence[dict]]]) -> list:
    """Rows (one per seed that lands on the frontier's range) of per-item :func:`excess`: ``method[s]`` is
    the checkpoint of seed ``s`` to compare, ``reference[s]`` that seed's plain runs. A seed whose point
    learned less than the start or more than any plain run is left out (the caller reports how many)."""
    if len(method) != len(reference):
        raise CourseError(f"excess_table(): {len(method)} method seeds but {len(reference)} reference seeds")
    return [row for row in (excess(p, ref) for p, ref in zip(method, reference)) if row is not None]


# ------------------------------------------------------------------ pictures

def mean_path(runs_of_seeds: Sequence[dict], start: dict | None = None) -> tuple[list, list]:
    """Mean (over seeds, then items) fine-tuning loss and forgetting at each checkpoint of one configuration's
    runs (``start`` prepended as step 0)."""
    n = len(runs_of_seeds[0]["points"])
    xs, ys = ([_mean(start["loss"])], [_mean(start["forgetting"])]) if start else ([], [])
    for k in range(n):
        xs.append(_mean([_mean(r["points"][k]["loss"]) for r in runs_of_seeds]))
        ys.append(_mean([_mean(r["points"][k]["forgetting"]) for r in runs_of_seeds]))
    return xs, ys


def plot_frontier(ax, groups: dict, start: dict, highlight: str | None = None) -> None:
    """Fine-tuning loss (x, falling to the right) against forgetting (y): one line per configuration
    (``groups``: name -> its runs over seeds), means over seeds; plain full fine-tuning as circles and solid
    lines, every other method as squares and dashes; ``highlight`` drawn thick."""
    for name, rs in groups.items():
        xs, ys = mean_path(rs, start)
        bold = name == highlight
        c = rs[0]["config"]
        plain = c["method"] == "full" and not (c["reg"] or c["dropout"] or c["weight_decay"])
        ax.plot(xs, ys, "o-" if plain else "s--",
                ms=6 if bold else 4, lw=3 if bold else 1, alpha=1 if bold or highlight is None else 0.5, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("fine-tuning loss (held-out, nats/token) — more learning →")
    ax.set_ylabel("forgetting (NLL rise on own answers, nats/token)")
    ax.legend(fontsize=7)
