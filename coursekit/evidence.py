"""The evidence layer: seeds, 95% intervals, verdicts and the claims ledger.

A claim of the lecture counts when an interval says so, not when one run printed a number above a
threshold. Everything a notebook needs for that lives here:

* :func:`over_seeds` runs one configuration over seeds and stacks its per-item values into a
  ``[seeds, items]`` array (the seed drives data order, LoRA init, sampling: :func:`coursekit.set_seed`).
* :func:`interval` — **the** interval routine: the estimate (grand mean of a ``[seeds, items]`` table)
  with a 95% t-interval whose standard error counts *both* sources of variation, seeds and items.
* :func:`effect` turns per-(seed, item) values of one effect (a difference: method − reference, after −
  before) into an :class:`Effect` with its interval and a verdict in the lecture's direction;
  :func:`claim` groups the effects of one lecture claim (``C0``…``C21``, :data:`CLAIMS`).
* the ledger (``python -m coursekit.course claims``) is built from the evidence store's plans and
  records by :func:`coursekit.store.ledger`.

**Why this interval.** Items and seeds are *crossed*: every seed is evaluated on the same items, and
effects are paired (method and reference on the same item and seed). Treating the S×I values as
independent overstates the evidence; a t-interval over the S per-seed means ignores that the items are
a sample too; a bootstrap that resamples 3 seeds understates seed-to-seed variance (it can only draw 10
distinct seed sets). The crossed random-effects model ``x[s,i] = μ + a_s + b_i + e_si`` has

    Var(x̄) = σ_a²/S + σ_b²/I + σ_e²/(S·I) = (MS_seeds + MS_items − MS_resid) / (S·I)

(two-way ANOVA mean squares; each variance component clipped at 0), and the interval is
``x̄ ± t·SE`` with Satterthwaite's degrees of freedom, which stay honest with 3 seeds. With one seed it
is the ordinary t-interval over items; with one item, the t-interval over seeds
(``tests/test_evidence.py`` checks both and the coverage on simulated data with a known mean).

**Verdicts** come from the interval and thresholds fixed before the run (``null``, usually 0 = no
effect; optionally a ``strength`` the lecture's claim needs): ``reproduced`` when the interval excludes
the null on the side the lecture says (``direction="greater"`` or ``"less"``) and, when the plan fixed a
strength, lies wholly past it too; ``weaker than claimed`` when it excludes the null on the right side but
not the strength (C7: a correlation of −0.72 against the claim's −0.8 is this, not ``opposite``);
``opposite`` when it excludes the null on the other side; ``inconclusive`` otherwise. A claim with several
effects is reproduced only when all of them are; it is opposite when any is, else inconclusive when any is,
else weaker than claimed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from .errors import CourseError

LEVEL = 0.95
DIRECTIONS = ("greater", "less")
VERDICTS = ("reproduced", "weaker than claimed", "inconclusive", "opposite")

# The lecture's claims (../shared/reference/claims.md): ID -> (notebook, the claim in one line).
CLAIMS: dict[str, tuple[str, str]] = {
    "C0": ("00", "the best post-training is no post-training: a prompt (note, retrieval) changes behaviour, weights untouched"),
    "C1": ("01", "one-example fine-tuning reaches the target but breaks locality (who-questions get the new name)"),
    "C2": ("01", "one defensive example protects only its own question; many short ones make the model terse"),
    "C3": ("01", "training on the model's own answers keeps locality with reliability, yet some probe still breaks"),
    "C4": ("01", "narrow post-training erases a format ability (JSON) epoch by epoch"),
    "C5": ("03", "post-training erases alignment (refusals); ~3-5% safety replay keeps it"),
    "C6": ("02", "LoRA learns less and forgets less; full FT and LoRA lie on one learn-vs-forget frontier"),
    "C7": ("02", "forgetting grows with learning, close to linearly in the fine-tuning loss"),
    "C8": ("02", "dropout and weight decay do not prevent forgetting"),
    "C9": ("02", "a per-parameter penalty (L2-SP, EWC) reduces forgetting"),
    "C10": ("03", "experience replay with a few percent of old data keeps old abilities"),
    "C11": ("03", "the model's own generations (pseudo replay, Magpie, SSR) replay nearly as well as real data"),
    "C12": ("03", "training on the model's own words (self-output, paraphrase) forgets less than human targets"),
    "C13": ("03", "skipping hard (high-perplexity) target tokens in the loss forgets less"),
    "C14": ("04", "facts are recalled through mid-layer MLPs at the subject's last token (causal tracing)"),
    "C15": ("04", "ROME edits one fact reliably, generally and locally; fine-tuning the same fact damages locality"),
    "C16": ("05", "adding task vectors gives a model with both skills"),
    "C17": ("05", "subtracting a task vector removes a skill while other abilities stay"),
    "C18": ("05", "task analogies tau_C + (tau_B - tau_A) build an unseen combination"),
    "C19": ("05", "mergekit's task arithmetic is the same arithmetic"),
    "C20": ("06", "test-time training on nearest neighbours beats the global model"),
    "C21": ("06", "TENT/SUTA/rotation TTT help on shifted data; continual TTA collapses; fast/slow + reset recovers"),
}


# ------------------------------------------------------------------ seeds

def over_seeds(fn: Callable[[int], dict | Sequence[float]], seeds: int | Iterable[int] = 3,
               progress: bool | str = "seeds") -> dict:
    """Run ``fn(seed)`` once per seed (after :func:`coursekit.set_seed`) and stack what it returns.

    ``fn`` returns per-item values: a list (one value per item) or a dict of such lists (one per
    measure). Returns a dict of ``numpy`` arrays of shape ``[seeds, items]`` (key ``"values"`` when ``fn``
    returns a list) plus ``"seeds"``. Every seed must return the same items.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from .seed import set_seed

    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise CourseError("over_seeds(): give at least one seed")
    rows = []
    it = tqdm(seeds, desc=progress if isinstance(progress, str) else "seeds", leave=False) if progress else seeds
    for s in it:
        set_seed(s)
        out = fn(s)
        rows.append(out if isinstance(out, dict) else {"values": out})
    keys = list(rows[0])
    if any(list(r) != keys for r in rows):
        raise CourseError("over_seeds(): every seed must return the same measures")
    stacked = {}
    for k in keys:
        lens = {len(r[k]) for r in rows}
        if len(lens) != 1:
            raise CourseError(f"over_seeds(): measure {k!r} has a different number of items per seed ({sorted(lens)})")
        stacked[k] = np.array([[float(v) for v in r[k]] for r in rows])
    stacked["seeds"] = np.array(seeds)
    return stacked


# ------------------------------------------------------------------ the interval

def _table(values):
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.ndim == 1:
        a = a[None, :]  # one seed, several items
    if a.ndim != 2 or a.size == 0:
        raise CourseError(f"interval(): values must be [items] or [seeds, items] (got shape {a.shape})")
    if not np.isfinite(a).all():
        raise CourseError("interval(): values contain NaN or inf — drop or fix those items first")
    return a


def standard_error(values) -> tuple[float, float, float]:
    """``(mean, standard error, degrees of freedom)`` of the grand mean of a ``[seeds, items]`` table
    under the crossed random-effects model (module docstring)."""
    a = _table(values)
    S, I = a.shape
    m = float(a.mean())
    if S == 1 and I == 1:
        raise CourseError("interval(): one seed and one item give no interval — use more items or seeds")
    if S == 1 or I == 1:
        x = a.ravel()
        n = x.size
        return m, float(x.std(ddof=1) / math.sqrt(n)), float(n - 1)
    rows, cols = a.mean(1), a.mean(0)
    ms_s = I * float(((rows - m) ** 2).sum()) / (S - 1)
    ms_i = S * float(((cols - m) ** 2).sum()) / (I - 1)
    resid = a - rows[:, None] - cols[None, :] + m
    ms_e = float((resid ** 2).sum()) / ((S - 1) * (I - 1))
    terms = [(max(ms_s, ms_e), S - 1), (max(ms_i, ms_e), I - 1), (-ms_e, (S - 1) * (I - 1))]
    var = sum(t for t, _ in terms) / (S * I)
    if var <= 0:  # every value identical
        return m, 0.0, float(S * I - 1)
    df = var ** 2 / sum((t / (S * I)) ** 2 / d for t, d in terms)
    return m, math.sqrt(var), float(df)


def interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the grand mean of ``values`` (``[items]`` or ``[seeds, items]``) and its
    ``level`` t-interval counting seed and item variation (module docstring)."""
    from scipy.stats import t

    if not 0 < level < 1:
        raise CourseError(f"interval(): level must be in (0, 1) (got {level})")
    m, se, df = standard_error(values)
    h = float(t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0
    return m, m - h, m + h


def verdict(low: float, high: float, direction: str, null: float = 0.0, strength: float | None = None) -> str:
    """``reproduced`` / ``weaker than claimed`` / ``inconclusive`` / ``opposite`` from an interval, in the
    lecture's direction (module docstring); ``strength`` is a threshold past ``null`` that the claim needs."""
    if direction not in DIRECTIONS:
        raise CourseError(f"verdict(): direction must be one of {DIRECTIONS} (got {direction!r})")
    sign = 1.0 if direction == "greater" else -1.0
    near, far = (low, high) if sign > 0 else (-high, -low)  # the interval seen as 'greater'
    if strength is not None and sign * (strength - null) <= 0:
        raise CourseError(f"verdict(): strength {strength} must lie past the null {null} in the direction {direction!r}")
    if near > sign * null:
        return "reproduced" if strength is None or near > sign * strength else "weaker than claimed"
    return "opposite" if far < sign * null else "inconclusive"


# ------------------------------------------------------------------ effects and claims

@dataclass
class Effect:
    """One measured effect of a claim, with its interval and verdict."""

    name: str
    estimate: float
    low: float
    high: float
    seeds: int
    items: int
    direction: str
    null: float
    verdict: str
    what: str = ""
    strength: float | None = None

    def holds(self) -> bool:
        """The verdict is ``reproduced``."""
        return self.verdict == "reproduced"

    def line(self, digits: int = 3) -> str:
        sign = ">" if self.direction == "greater" else "<"
        need = f"{sign} {self.null:g}" + ("" if self.strength is None else f", claimed {sign} {self.strength:g}")
        return (f"{self.name}: {self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({self.seeds} seed{'s' if self.seeds != 1 else ''} x {self.items} items; lecture: {need}) "
                f"-> {self.verdict}")


def effect(name: str, values, direction: str, null: float = 0.0, what: str = "",
           strength: float | None = None) -> Effect:
    """An :class:`Effect` from per-(seed, item) values of one effect (``[items]`` or ``[seeds, items]``)."""
    a = _table(values)
    est, lo, hi = interval(a)
    return Effect(name=name, estimate=est, low=lo, high=hi, seeds=int(a.shape[0]), items=int(a.shape[1]),
                  direction=direction, null=float(null), verdict=verdict(lo, hi, direction, null, strength),
                  what=what, strength=None if strength is None else float(strength))


@dataclass
class Claim:
    """A lecture claim (``C0``…) with its measured effects; the verdict combines theirs."""

    id: str
    effects: list = field(default_factory=list)
    note: str = ""

    @property
    def verdict(self) -> str:
        vs = {e.verdict for e in self.effects}
        for v in ("opposite", "inconclusive", "weaker than claimed"):
            if v in vs:
                return v
        return "reproduced" if vs else "inconclusive"

    def __getitem__(self, name: str) -> Effect:
        for e in self.effects:
            if e.name == name:
                return e
        raise KeyError(f"{self.id} has no effect {name!r} (has {[e.name for e in self.effects]})")

    def report(self, digits: int = 3) -> str:
        head = f"{self.id} {self.verdict.upper()}: {CLAIMS[self.id][1]}"
        return "\n".join([head] + [f"  {e.line(digits)}" for e in self.effects])

    def to_dict(self) -> dict:
        return {"id": self.id, "verdict": self.verdict, "note": self.note,
                "effects": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(e).items()}
                            for e in self.effects]}


def claim(claim_id: str, *effects: Effect, note: str = "") -> Claim:
    """Group the effects of lecture claim ``claim_id`` (one of :data:`CLAIMS`)."""
    if claim_id not in CLAIMS:
        raise CourseError(f"unknown claim {claim_id!r}: the lecture's claims are C0..C{len(CLAIMS) - 1}")
    if not effects or not all(isinstance(e, Effect) for e in effects):
        raise CourseError(f"claim({claim_id!r}) needs at least one Effect (from ck.evidence.effect)")
    return Claim(id=claim_id, effects=list(effects), note=note)


# ------------------------------------------------------------------ the ledger

def plot_effects(ax, effects: Sequence[Effect], title: str = "") -> None:
    """One row per effect on a matplotlib axis: its estimate with the 95% interval as error bar, and the
    threshold fixed before the run as a red tick."""
    ax.errorbar([e.estimate for e in effects], range(len(effects)), fmt="o",
                xerr=[[e.estimate - e.low for e in effects], [e.high - e.estimate for e in effects]])
    for i, e in enumerate(effects):
        ax.plot([e.null], [i], "|", color="tab:red", ms=14)
    ax.set_yticks(range(len(effects)), [e.name.replace("_", " ") for e in effects], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
