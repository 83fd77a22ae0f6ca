"""The evidence store: pre-registered plans, committed records, and live re-verification.

Computing the evidence is separated from checking it, as a careful lab does:

* a **plan** per notebook (``evidence/plan/<notebook>.yaml``) fixes, before any record exists, the
  configurations with their seeds and the reason for each size, every claim's effects (metric,
  direction, null, optional strength), the tolerance of re-verification and the sample that every test
  run recomputes (:func:`load_plan`);
* a **record** per configuration and seed (``evidence/records/<notebook>/<configuration>/seed-<s>.json``)
  holds the per-item values of one run (and, to show, its extras: answers, loss curves) with the hash of the plan entry it was made under and the
  fingerprints of code, data, libraries and starting weights, the device, the CPU's kernels and the wall
  time (:func:`compute_record`). ``make evidence`` (``python -m coursekit.store make``) writes every
  missing or stale record, one file as each run ends, so an interrupted run loses at most one;
* a notebook reads its numbers from the records (:class:`Evidence`), so what a checked cell prints is the
  same on every machine, and **recomputes the plan's sample live** (:meth:`Evidence.verify`): a value
  outside the tolerance fails with one line naming the record, the metric, both values and the tolerance.
  ``COURSEKIT_EVIDENCE=all`` recomputes every record (a GPU user); ``make verify-all`` does the same
  from the shell.

A record is **stale** when the plan entry it was made under changed (its ``plan_hash``): changing a
configuration or the shared sizes of a plan invalidates its records, while editing prose (``why``) or a
claim's thresholds does not (a threshold changed after records exist is a deviation: log it in
``evidence/DEVIATIONS.md``). Code changes do not make records stale: the live sample catches a change
that moves a result. Taught in notebook 00, section 5 (the worked example of the evidence standard).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CourseError

ROOT = Path(__file__).resolve().parent.parent
MODES = ("sample", "all")
RECORD_FORMAT = 1
DIGITS = 7  # decimals kept in a record (re-verification tolerances are ≥ 1e-6)


def evidence_dir() -> Path:
    """The store's folder: ``$COURSEKIT_EVIDENCE_DIR`` (tests) or ``evidence/`` of the checkout."""
    return Path(os.environ.get("COURSEKIT_EVIDENCE_DIR") or ROOT / "evidence")


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Configuration:
    """One pre-registered configuration of a notebook's experiment: what runs, with which settings, on
    which seeds, and why these sizes."""

    notebook: str
    name: str
    run: str  # "module:function" in coursekit, called as function(config, seed)
    config: dict
    seeds: tuple
    why: str

    @property
    def hash(self) -> str:
        """The plan hash a record made under this entry carries."""
        return _digest({"notebook": self.notebook, "name": self.name, "run": self.run, "config": self.config})

    def path(self, seed: int) -> Path:
        return evidence_dir() / "records" / self.notebook / self.name / f"seed-{seed}.json"


@dataclass(frozen=True)
class EffectPlan:
    """One effect of a claim: ``values`` is an expression over records (``incontext.reliability -
    foundation.reliability``), judged in ``direction`` against ``null`` (the plan's ``no_effect``, YAML
    reads a key ``null`` as nothing) and, when the claim needs one, ``strength``."""

    name: str
    values: str
    direction: str
    null: float
    strength: float | None
    metric: str


@dataclass
class Plan:
    """A notebook's pre-registration (``evidence/plan/<notebook>.yaml``)."""

    notebook: str
    configurations: dict
    claims: dict  # claim id -> list of EffectPlan
    verify: list  # (configuration name, seed) recomputed by every test run
    tolerance: dict  # {"atol": ..., "rtol": ...}
    source: dict = field(default_factory=dict, repr=False)

    def reads(self, cid: str) -> list:
        """The configurations the effects of claim ``cid`` read, sorted."""
        return sorted({n for e in self.claims[cid] for n in _names(e.values)})

    def claim_hash(self, cid: str) -> str:
        """Hash of a claim's entry and of the configurations its effects read."""
        return _digest({"claim": self.source["claims"][cid],
                        "configurations": [self.configurations[n].hash for n in self.reads(cid)]})

    def records(self):
        """Every ``(configuration, seed)`` the plan asks for."""
        return [(c, s) for c in self.configurations.values() for s in c.seeds]


def _plan_path(notebook: str) -> Path:
    return evidence_dir() / "plan" / f"{notebook}.yaml"


class _PlanReader:
    """Field checks that name the plan file and the field, in one line."""

    def __init__(self, path: Path):
        self.where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    def fail(self, field_: str, what: str):
        raise CourseError(f"{self.where}: {field_} {what}")

    def get(self, d, key, kind, field_):
        v = d.get(key) if isinstance(d, dict) else None
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            self.fail(f"{field_}.{key}" if field_ else key, f"must be {getattr(kind, '__name__', kind)} (got {v!r})")
        return v


def _configurations(r: _PlanReader, raw: dict, notebook: str) -> dict:
    common = raw.get("common", {})
    if not isinstance(common, dict):
        r.fail("common", "must be a mapping of shared sizes")
    out = {}
    for name, c in r.get(raw, "configurations", dict, "").items():
        where = f"configurations.{name}"
        seeds = r.get(c, "seeds", list, where)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            r.fail(f"{where}.seeds", "must be a non-empty list of distinct non-negative integers")
        run = c.get("run", raw.get("run"))
        if not isinstance(run, str) or ":" not in run:
            r.fail(f"{where}.run", "must name 'module:function' (here or at the plan's top)")
        out[name] = Configuration(notebook, name, run, {**common, **(c.get("config") or {})}, tuple(seeds),
                                  r.get(c, "why", str, where))
    return out


def _effects(r: _PlanReader, raw: dict, configurations: dict) -> dict:
    from .evidence import CLAIMS, DIRECTIONS

    claims = {}
    for cid, c in (raw.get("claims") or {}).items():
        if cid not in CLAIMS:
            r.fail(f"claims.{cid}", f"is not a lecture claim (C0..C{len(CLAIMS) - 1})")
        effects = []
        for i, e in enumerate(r.get(c, "effects", list, f"claims.{cid}")):
            where = f"claims.{cid}.effects[{i}]"
            expr = r.get(e, "values", str, where)
            unknown = sorted(n for n in _names(expr, r, where) if n not in configurations)
            if unknown:
                r.fail(f"{where}.values", f"reads unknown configuration(s) {unknown}")
            if e.get("direction") not in DIRECTIONS:
                r.fail(f"{where}.direction", f"must be one of {DIRECTIONS} (got {e.get('direction')!r})")
            null, strength = e.get("no_effect", 0), e.get("strength")
            if not isinstance(null, (int, float)) or strength is not None and not isinstance(strength, (int, float)):
                r.fail(where, "no_effect and strength must be numbers")
            effects.append(EffectPlan(r.get(e, "name", str, where), expr, e["direction"], float(null),
                                      None if strength is None else float(strength), r.get(e, "metric", str, where)))
        claims[cid] = effects
    return claims


def _tolerance(r: _PlanReader, tol: dict) -> dict:
    """``{"atol", "rtol", "max_changed", "by_metric": {metric: {...}}}``: a metric whose values live on another
    scale (a weight difference of 1e-9 beside log-probabilities) gets its own; ``max_changed`` is the share of a
    metric's items allowed outside atol + rtol (a 0/1 metric from greedy decoding may flip on a near tie under
    another CPU's kernels; a real change moves many items). ``mean_atol`` compares the metric's mean over its items
instead, for a computation whose items are not reproducible one by one across CPUs (a small network trained for
many steps: another CPU's last digits give another, equally good model)."""
    def one(t, where):
        if not isinstance(t, dict) or not t or not set(t) <= {"atol", "rtol", "max_changed", "mean_atol"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in t.values()) \
                or t.get("max_changed", 0) >= 0.5:
            r.fail(where, "must give atol, rtol (non-negative numbers) and/or max_changed (a share below 0.5), "
                          "or mean_atol (a non-negative number)")
        out = {"atol": float(t.get("atol", 0)), "rtol": float(t.get("rtol", 0)), "max_changed": float(t.get("max_changed", 0))}
        return {**out, "mean_atol": float(t["mean_atol"])} if "mean_atol" in t else out

    by_metric = tol.get("by_metric", {})
    if not isinstance(by_metric, dict):
        r.fail("tolerance.by_metric", "must map metric names to {atol, rtol, max_changed}")
    out = one({k: v for k, v in tol.items() if k != "by_metric"}, "tolerance")
    return {**out, "by_metric": {m: one(t, f"tolerance.by_metric.{m}") for m, t in by_metric.items()}}


def load_plan(notebook: str) -> Plan:
    """The validated plan of ``notebook`` (one-line :class:`CourseError` naming the field when malformed)."""
    import yaml

    path = _plan_path(notebook)
    if not path.exists():
        raise CourseError(f"no evidence plan for {notebook}: expected {path} (evidence/README.md says how to write one)")
    r = _PlanReader(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        r.fail("", f"is not valid YAML ({' '.join(str(e).split())[:120]})")
    if not isinstance(raw, dict) or raw.get("notebook") != notebook:
        r.fail("notebook", f"must be {notebook!r}")
    configurations = _configurations(r, raw, notebook)
    claims = _effects(r, raw, configurations)
    tolerance = _tolerance(r, r.get(raw, "tolerance", dict, ""))
    verify = []
    for entry in r.get(raw, "verify", list, ""):
        name, _, seed = str(entry).partition("/seed-")
        if name not in configurations or not seed.isdigit() or int(seed) not in configurations[name].seeds:
            r.fail("verify", f"entry {entry!r} is not '<configuration>/seed-<s>' of a planned record")
        verify.append((name, int(seed)))
    if not verify:
        r.fail("verify", "must name at least one record that every test run recomputes")
    return Plan(notebook, configurations, claims, verify, tolerance, raw)


def plans() -> list[Plan]:
    """Every plan in the store, in notebook order."""
    return [load_plan(p.stem) for p in sorted((evidence_dir() / "plan").glob("*.yaml"))]


# ------------------------------------------------------------------ expressions over records

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _names(expr: str, r: _PlanReader | None = None, where: str = "") -> set:
    """The configurations an effect's expression reads (``name.metric`` terms)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        if r:
            r.fail(f"{where}.values", f"is not an expression ({expr!r})")
        raise CourseError(f"not an expression: {expr!r}") from None
    return {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _evaluate(node, term):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, term)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, term), _evaluate(node.right, term))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, term)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return term(node.value.id, node.attr)
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "mean_items" and len(node.args) == 1:
        return _evaluate(node.args[0], term).mean(-1, keepdims=True)  # one value per seed, broadcast over items
    raise CourseError(f"effect expressions use name.metric, numbers, + - * /, mean_items(...) and parentheses "
                      f"(got {ast.unparse(node)!r})")


# ------------------------------------------------------------------ records

def _one_line(path: Path, what: str, plan: Plan | None = None) -> CourseError:
    base = evidence_dir().parent
    rel = path.relative_to(base) if path.is_relative_to(base) else path
    claims = ",".join(_claims_reading(plan, path.parent.name)) if plan else ""
    how = f"make evidence CLAIMS={claims}" if claims else "make evidence"
    return CourseError(f"{rel} {what}: run `{how}` to (re)compute it")


def _claims_reading(plan: Plan, configuration: str) -> list:
    return [cid for cid in plan.claims if configuration in plan.reads(cid)]


def read_record(path: Path) -> dict:
    """A record as stored; a missing or unreadable one raises a one-line :class:`CourseError`."""
    if not path.exists():
        raise _one_line(path, "is missing")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        values = rec["values"]
        ok = rec.get("format") == RECORD_FORMAT and isinstance(values, dict) and values and all(
            isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()) for v in values.values())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise _one_line(path, "is corrupt (not a record of this format)")
    return rec


def status(cfg: Configuration, seed: int) -> str:
    """``ok``, ``missing``, ``corrupt`` or ``stale`` (made under another plan entry)."""
    path = cfg.path(seed)
    if not path.exists():
        return "missing"
    try:
        rec = read_record(path)
    except CourseError:
        return "corrupt"
    return "ok" if rec.get("plan_hash") == cfg.hash and rec.get("seed") == seed else "stale"


def _run(cfg: Configuration, seed: int) -> dict:
    """Call the configuration's function on a freshly seeded process state and check what it returns:
    ``{"values": {metric: {item id: number}}, "extras": {...}}`` — values are verified, extras (answers to
    read, loss curves: any JSON) are only shown. Returns the same with values rounded to :data:`DIGITS`."""
    from .seed import set_seed

    module, _, fn = cfg.run.partition(":")
    try:
        func = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        raise CourseError(f"evidence plan {cfg.notebook}: configuration {cfg.name} runs {cfg.run!r}, which does not exist") from None
    set_seed(seed)
    got = func(dict(cfg.config), seed)
    values = got.get("values") if isinstance(got, dict) else None
    if not isinstance(values, dict) or not values or not all(isinstance(v, dict) and v for v in values.values()) \
            or not set(got) <= {"values", "extras"}:
        raise CourseError(f"{cfg.run} must return {{'values': {{metric: {{item id: number}}}}, 'extras': {{...}}}}")
    out = {}
    for metric, per_item in values.items():
        vals = {str(k): float(v) for k, v in per_item.items()}
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            raise CourseError(f"{cfg.run}: metric {metric!r} is not finite for item(s) {bad[:3]}")
        out[str(metric)] = {k: round(v, DIGITS) for k, v in vals.items()}
    return {"values": out, "extras": got.get("extras", {})}


def provenance(wall_s: float) -> dict:
    """What made a record: code, data, library versions, starting weights, device, kernels, threads, time."""
    import datetime

    import torch

    from .cache import versions
    from .models import weights_fingerprint
    from .profile import get_profile

    def tree(folder: Path, pattern: str) -> str:
        h = hashlib.sha256()
        for p in sorted(folder.glob(pattern)):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        return h.hexdigest()[:16]

    return {"code": tree(ROOT / "coursekit", "*.py"), "data": tree(ROOT / "data", "*.json*"),
            "versions": versions(), "weights": weights_fingerprint()[:16], "device": get_profile().device,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "wall_s": round(wall_s, 1), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def compute_record(cfg: Configuration, seed: int) -> dict:
    """Run one configuration on one seed and return its record (not written)."""
    t0 = time.time()
    got = _run(cfg, seed)
    return {"format": RECORD_FORMAT, "notebook": cfg.notebook, "configuration": cfg.name, "seed": seed,
            "plan_hash": cfg.hash, "run": cfg.run, "config": cfg.config, **got,
            "provenance": provenance(time.time() - t0)}


def write_record(cfg: Configuration, rec: dict) -> Path:
    """Write a record atomically (a half-written file is never visible)."""
    from .cache import atomic_write

    path = cfg.path(rec["seed"])
    atomic_write(path, lambda tmp: tmp.write_text(_dumps(rec), encoding="utf-8"))
    return path


def _dumps(rec: dict) -> str:
    """A record as text: indented, except that each metric's items sit on one line (a record of 30 000 values
    stays a few hundred kB, and a diff still names the metric that changed)."""
    mark = "\0values\0"
    text = json.dumps({**rec, "values": mark}, indent=1, ensure_ascii=False)
    lines = ",\n".join(f"  {json.dumps(m, ensure_ascii=False)}: {json.dumps(v, separators=(',', ':'))}"
                        for m, v in rec["values"].items())
    return text.replace(json.dumps(mark), "{\n" + lines + "\n }") + "\n"


# ------------------------------------------------------------------ verification

def _metric_tolerance(tolerance: dict, metric: str) -> dict:
    """The plan's tolerance for ``metric``: its own entry in ``by_metric`` (a name or a pattern such as
    ``json_valid*``; the exact name wins), else the plan's."""
    from fnmatch import fnmatchcase

    by = tolerance.get("by_metric", {})
    if metric in by:
        return by[metric]
    return next((t for pattern, t in by.items() if fnmatchcase(metric, pattern)), tolerance)


def compare(cfg: Configuration, seed: int, committed: dict, live: dict, tolerance: dict) -> float:
    """The largest ``|live − committed|`` over every metric and item (a ``mean_atol`` metric: its mean); raises one
    line when a metric has more items outside ``atol + rtol·|committed|`` than its ``max_changed`` share allows
    (naming the first), when a ``mean_atol`` metric's mean moves more than that, or when the metrics or items differ."""
    rel = f"{cfg.notebook}/{cfg.name}/seed-{seed}"
    if set(committed) != set(live):
        raise CourseError(f"evidence record {rel}: the live run gives metrics {sorted(live)}, the record {sorted(committed)}")
    worst = 0.0
    for metric, old in committed.items():
        new, t = live[metric], _metric_tolerance(tolerance, metric)
        if list(old) != list(new):
            raise CourseError(f"evidence record {rel}, metric {metric}: the live run scores other items than the record")
        if "mean_atol" in t:
            a, b = sum(old.values()) / len(old), sum(new[i] for i in old) / len(old)
            worst = max(worst, abs(b - a))
            if not abs(b - a) <= t["mean_atol"]:
                raise CourseError(f"evidence record {rel}, metric {metric}: mean over {len(old)} items committed {a:.6g}, "
                                  f"recomputed {b:.6g}, tolerance {t['mean_atol']:.2g}")
            continue
        off = [(item, a, new[item], t["atol"] + t["rtol"] * abs(a)) for item, a in old.items()
               if not abs(new[item] - a) <= t["atol"] + t["rtol"] * abs(a)]
        worst = max([worst, *(abs(new[i] - a) for i, a in old.items())])
        if len(off) > t.get("max_changed", 0.0) * len(old):
            item, a, b, tol = off[0]
            more = f" ({len(off)} of {len(old)} items off, {t['max_changed']:g} allowed)" if t.get("max_changed") else ""
            raise CourseError(f"evidence record {rel}, metric {metric}, item {item}: committed {a:.6g}, "
                              f"recomputed {b:.6g}, tolerance {tol:.2g}{more}")
    return worst


def mode() -> str:
    """``$COURSEKIT_EVIDENCE``: ``sample`` (default: recompute the plan's sample) or ``all``."""
    m = (os.environ.get("COURSEKIT_EVIDENCE") or "sample").strip().lower()
    if m not in MODES:
        raise CourseError(f"unknown COURSEKIT_EVIDENCE {m!r}: choose one of {', '.join(MODES)}")
    return m


# ------------------------------------------------------------------ a notebook's evidence

@dataclass
class Verification:
    """What :meth:`Evidence.verify` recomputed: ``ok`` unless a value fell outside the tolerance (``mismatch``:
    the one line naming the record, metric, item, both values and the tolerance)."""

    tolerance: dict
    strict: bool = True
    checked: list = field(default_factory=list)  # (configuration, seed, number of values)
    mismatch: str | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def __str__(self) -> str:
        if self.mismatch:
            return f"MISMATCH: {self.mismatch}"
        which = ", ".join(f"{n}/seed-{s}" for n, s, _ in self.checked)
        own = f"; {len(self.tolerance['by_metric'])} metric(s) with their own" if self.tolerance["by_metric"] else ""
        return (f"{len(self.checked)} record(s) recomputed live ({which}): {sum(k for _, _, k in self.checked)} values, "
                f"every one within the plan's tolerance (atol {self.tolerance['atol']:g}, rtol {self.tolerance['rtol']:g}{own})")


_WHY = {"missing": "is missing", "corrupt": "is corrupt (not a record of this format)",
        "stale": "is stale (made under another plan entry)"}


class Evidence:
    """A notebook's evidence: its plan, its records (every one present and fresh, else one line naming
    ``make evidence``), the claims built from them, and the live re-verification of the plan's sample.

    >>> ev = Evidence("00_foundation_model")
    >>> ev.verify()                 # recompute the plan's sample live and compare (one line on a mismatch)
    >>> print(ev.claim("C0").report())   # from the committed records: the same on every machine
    """

    def __init__(self, notebook: str):
        self.plan = load_plan(notebook)
        self.records = {}
        for cfg, seed in self.plan.records():
            st = status(cfg, seed)
            if st != "ok":
                raise _one_line(cfg.path(seed), _WHY[st], self.plan)
            self.records[(cfg.name, seed)] = read_record(cfg.path(seed))
        self.live: dict = {}

    def table(self, name: str, metric: str):
        """``([seeds, items] array, item ids)`` of one metric of one configuration, seeds in plan order."""
        import numpy as np

        cfg = self.plan.configurations.get(name)
        if cfg is None:
            raise CourseError(f"{self.plan.notebook}: no configuration {name!r} (has {sorted(self.plan.configurations)})")
        rows = [self.records[(name, s)]["values"] for s in cfg.seeds]
        if any(metric not in r for r in rows):
            raise CourseError(f"{self.plan.notebook}/{name}: no metric {metric!r} (has {sorted(rows[0])})")
        ids = list(rows[0][metric])
        if any(list(r[metric]) != ids for r in rows):
            raise CourseError(f"{self.plan.notebook}/{name}: the seeds' records score different items for {metric!r}")
        return np.array([[r[metric][i] for i in ids] for r in rows]), ids

    def values(self, expr: str):
        """An effect's ``[seeds, items]`` values: ``expr`` over ``configuration.metric`` terms, items paired by
        id, a one-seed configuration broadcast against a several-seed one, equal seed lists paired by seed."""
        seen: dict = {}

        def term(name, metric):
            a, ids = self.table(name, metric)
            seeds = self.plan.configurations[name].seeds
            for other_ids, other_seeds in seen.values():
                if other_ids != ids:
                    raise CourseError(f"{self.plan.notebook}: {expr!r} pairs metrics over different items")
                if len(seeds) > 1 and len(other_seeds) > 1 and seeds != other_seeds:
                    raise CourseError(f"{self.plan.notebook}: {expr!r} pairs configurations with different seeds")
            seen[(name, metric)] = (ids, seeds)
            return a

        return _evaluate(ast.parse(expr, mode="eval"), term)

    def claim(self, cid: str):
        """The lecture claim ``cid`` from the records, with the plan's effects, directions and thresholds."""
        from .evidence import claim, effect

        if cid not in self.plan.claims:
            raise CourseError(f"{self.plan.notebook}'s plan has no claim {cid} (has {sorted(self.plan.claims)})")
        return claim(cid, *[effect(e.name, self.values(e.values), e.direction, e.null, e.metric, e.strength)
                            for e in self.plan.claims[cid]], note=f"plan {self.plan.claim_hash(cid)}")

    def verify(self, which: str | None = None, progress: bool = True) -> "Verification":
        """Recompute the plan's sample (``which="all"``: every record; default ``$COURSEKIT_EVIDENCE``) live and
        compare each with its committed record, stopping at the first value outside the tolerance. A notebook
        asserts ``.ok`` (on a GPU, whose kernels differ more than the CPUs' the tolerance absorbs, it warns)."""
        from tqdm.auto import tqdm

        from .profile import get_profile

        which = which or mode()
        todo = self.plan.verify if which == "sample" else [(c.name, s) for c, s in self.plan.records()]
        result = Verification(self.plan.tolerance, strict=get_profile().device == "cpu")
        for name, seed in tqdm(todo, desc="recomputing records live", disable=not progress, leave=False):
            cfg, t0 = self.plan.configurations[name], time.time()
            live = _run(cfg, seed)
            self.live[(name, seed)] = {**live, "wall_s": time.time() - t0}
            try:
                compare(cfg, seed, self.records[(name, seed)]["values"], live["values"], self.plan.tolerance)
            except CourseError as e:
                result.mismatch = str(e)
                if not result.strict:
                    print(f"WARNING (on {get_profile().device}, not failing): {e}", file=sys.stderr)
                break
            result.checked.append((name, seed, sum(len(v) for v in live["values"].values())))
        return result

    def report_live(self) -> str:
        """One line per recomputed record: the tolerance it met, and each metric's mean in your run beside the
        course's committed seeds of that configuration."""
        lines = []
        for (name, seed), got in self.live.items():
            lines.append(f"{name}/seed-{seed} ({got['wall_s']:.1f} s)")
            for metric, per_item in got["values"].items():
                a, _ = self.table(name, metric)
                seeds = self.plan.configurations[name].seeds
                mine = sum(per_item.values()) / len(per_item)
                lines.append(f"  {metric}: your run {mine:+.3f}; the course's {len(seeds)} seed"
                             f"{'s' if len(seeds) > 1 else ''}: {a.mean():+.3f} (per seed {a.mean(1).min():+.3f} .. {a.mean(1).max():+.3f})")
        return "\n".join(lines)


# ------------------------------------------------------------------ make evidence, verify-all, the ledger

def _selected(claims: list | None) -> list:
    """``(plan, configuration, seed)`` for every record the given claims rest on (all when None)."""
    out, all_plans = [], plans()
    held = {cid for plan in all_plans for cid in plan.claims}
    unknown = sorted(set(claims or ()) - held)
    if unknown:
        raise CourseError(f"no evidence plan holds {', '.join(unknown)} (the store holds {', '.join(sorted(held, key=lambda c: int(c[1:])))})")
    for plan in all_plans:
        wanted = None if claims is None else {n for cid in claims if cid in plan.claims for n in plan.reads(cid)}
        out += [(plan, c, s) for c, s in plan.records() if wanted is None or c.name in wanted]
    return out


def make(claims: list | None = None, progress: bool = True) -> int:
    """Compute every missing, stale or corrupt record of ``claims`` (all when None); each is written when
    its run ends. Returns how many were computed."""
    from tqdm.auto import tqdm

    todo = [(p, c, s) for p, c, s in _selected(claims) if status(c, s) != "ok"]
    for plan, cfg, seed in tqdm(todo, desc="make evidence", unit="record", disable=not progress):
        path = write_record(cfg, compute_record(cfg, seed))
        tqdm.write(f"wrote {path.relative_to(evidence_dir())} ({read_record(path)['provenance']['wall_s']} s)")
    return len(todo)


def verify_all(claims: list | None = None, progress: bool = True) -> int:
    """Recompute every record of ``claims`` (all when None) and compare; one line at the first mismatch."""
    from tqdm.auto import tqdm

    todo = _selected(claims)
    for plan, cfg, seed in tqdm(todo, desc="verify-all", unit="record", disable=not progress):
        path = cfg.path(seed)
        if status(cfg, seed) != "ok":
            raise _one_line(path, _WHY[status(cfg, seed)], plan)
        compare(cfg, seed, read_record(path)["values"], _run(cfg, seed)["values"], plan.tolerance)
    return len(todo)


def _records_line(plan: Plan, cid: str) -> str:
    used = plan.reads(cid)
    return ", ".join(f"{n} ({len(plan.configurations[n].seeds)} seed{'s' if len(plan.configurations[n].seeds) > 1 else ''})"
                     for n in used)


def ledger(notebook_results=()) -> str:
    """One row per lecture claim (C0..C21), built from the plans and records of the store; a claim no plan
    holds yet is taken from ``notebook_results`` (``COURSEKIT_RESULT`` payloads) and says so."""
    from .evidence import CLAIMS

    stored, problems = {}, {}
    for plan in plans():
        try:
            ev = Evidence(plan.notebook)
        except CourseError as e:
            problems.update({cid: str(e) for cid in plan.claims})
            continue
        stored.update({cid: (ev.claim(cid), plan) for cid in plan.claims})
    scraped = {c["id"]: c for r in notebook_results for c in r.get("claims", [])}
    head = (f"{'claim':5s} {'nb':3s} {'verdict':19s} {'estimate':>9s}  {'95% interval':20s} {'seeds':>5s} "
            f"{'items':>5s}  effect")
    lines = [head, "-" * len(head)]
    for cid, (nb, text) in CLAIMS.items():
        if cid in stored:
            c, plan = stored[cid]
            lines.append(f"{cid:5s} {nb:3s} {c.verdict:19s} {text}")
            lines.append(f"{'':9s} plan {plan.claim_hash(cid)} (evidence/plan/{plan.notebook}.yaml); records: "
                         f"{_records_line(plan, cid)}")
            effects = [(e.verdict, e.estimate, e.low, e.high, e.seeds, e.items, e.name, e.direction, e.null)
                       for e in c.effects]
        elif cid in problems:
            lines.append(f"{cid:5s} {nb:3s} {'no records':19s} {text}\n{'':9s} {problems[cid]}")
            continue
        elif cid in scraped:
            c = scraped[cid]
            lines.append(f"{cid:5s} {nb:3s} {c['verdict']:19s} {text}\n{'':9s} from the notebook's output "
                         "(not yet in the evidence store)")
            effects = [(e["verdict"], e["estimate"], e["low"], e["high"], e["seeds"], e["items"], e["name"],
                        e["direction"], e["null"]) for e in c["effects"]]
        else:
            lines.append(f"{cid:5s} {nb:3s} {'not measured':19s} {text}")
            continue
        for v, est, lo, hi, s, n, name, d, null in effects:
            iv = f"[{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"{'':9s} {v:19s} {est:+9.3f}  {iv:20s} {s:5d} {n:5d}  {name} ({'>' if d == 'greater' else '<'} {null:g})")
    return "\n".join(lines)


def timings() -> str:
    """Per notebook: the records' measured compute time (``make evidence`` from an empty store) and, when a
    ``make test`` or ``make course`` wrote ``build/timings.json``, the notebook's time in verify mode."""
    measured = {}
    path = ROOT / "build" / "timings.json"
    if path.exists():
        try:
            measured = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise CourseError(f"{path} is not JSON: delete it and run `make test` again") from None
    lines = [f"{'notebook':40s} {'records':>7s} {'make evidence':>14s} {'notebook (verify mode)':>23s}",
             "-" * 87]
    for plan in plans():
        walls = [read_record(c.path(s))["provenance"]["wall_s"] for c, s in plan.records() if status(c, s) == "ok"]
        nb = measured.get(plan.notebook)
        lines.append(f"{plan.notebook:40s} {len(walls):3d}/{len(plan.records()):<3d} {sum(walls) / 60:10.1f} min "
                     f"{'' if nb is None else f'{nb / 60:19.1f} min':>23s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m coursekit.store make|verify|status|timings [--claims C0,C9] [--all]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m coursekit.store", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("make", "verify", "status", "timings"))
    ap.add_argument("--claims", default="", help="comma-separated claim ids (default: every claim)")
    ap.add_argument("--all", action="store_true", help="verify: recompute every record, not only the plans' samples")
    a = ap.parse_args(argv)
    claims = [c.strip().upper() for c in a.claims.split(",") if c.strip()] or None
    try:
        from . import setup

        setup()  # the threads of $COURSEKIT_THREADS, quiet library warnings
        if a.command == "make":
            print(f"{make(claims)} record(s) computed; the store is complete for "
                  f"{'every claim' if claims is None else ', '.join(claims)}")
        elif a.command == "verify":
            print(f"{verify_all(claims) if a.all else _verify_samples(claims)} record(s) recomputed live: all within tolerance")
        elif a.command == "status":
            for plan, cfg, seed in _selected(claims):
                print(f"{status(cfg, seed):8s} {cfg.path(seed).relative_to(evidence_dir())}")
        else:
            print(timings())
    except CourseError as e:
        print(f"CourseError: {e}", file=sys.stderr)
        return 2
    return 0


def _verify_samples(claims: list | None) -> int:
    n = 0
    for plan in plans():
        if claims is None or set(claims) & set(plan.claims):
            check = Evidence(plan.notebook).verify("sample")
            if not check.ok:
                raise CourseError(check.mismatch)
            n += len(check.checked)
    return n


if __name__ == "__main__":
    sys.exit(main())
