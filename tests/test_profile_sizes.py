"""Profiles hold: every ``P.pick(ci=…, full=…)`` in the notebooks, evaluated for both profiles against the data it
acts on — without running a notebook.

The picks are read from the notebooks' code (ast) and evaluated for ``ci`` and ``full``; the course data comes
from coursekit's loaders. Generic rules: every notebook has profile sizes, and ``full`` never repeats the ``ci``
value (a pick that is the same everywhere is a constant, not a size). Data rules (below, one per size that acts on
data): no replay share that rounds to zero examples or asks for more examples than the pool holds, no slice
larger than its data, no LoRA rank above the rank of the matrices it adapts. A rule whose pick disappeared from its
notebook fails too, so the table follows the notebooks.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from coursekit.abilities import load_old_abilities
from coursekit.profile import PROFILES, Profile

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# SmolLM2-135M-Instruct (config.json): hidden 576, 9 heads x 64, 3 key/value heads -> k/v projections are 576 x 192
SMALLEST_ADAPTED_DIM = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 576,
                        "up_proj": 576, "down_proj": 576}


def _code(nb: dict) -> list[tuple[int, str]]:
    out = []
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            out.append((i, "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))))
    return out


def _is_pick(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "pick"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "P")


def _labels(tree) -> dict[int, str]:
    """id(pick node) -> a readable name: the variable it is assigned to, ``f(kw=)`` or ``xs[:]``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and _is_pick(node.value):
                    out[id(node.value)] = t.id
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    for tt, vv in zip(t.elts, node.value.elts):
                        if isinstance(tt, ast.Name) and _is_pick(vv):
                            out[id(vv)] = tt.id
        if isinstance(node, ast.Call):
            fname = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "?")
            for kw in node.keywords:
                if _is_pick(kw.value):
                    out.setdefault(id(kw.value), f"{fname}({kw.arg}=)")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice) and _is_pick(node.slice.upper):
            out.setdefault(id(node.slice.upper), f"{ast.unparse(node.value)}[:]")
    return out


def _data():
    from coursekit import forgetting as fg, prompting, replay as rp, rome

    skills, probes, rq, safety = fg.load_skills(), fg.load_probes(), rp.load_replay_questions(), rp.load_safety()
    return SimpleNamespace(skills=skills, probes=probes, rq=rq, safety=safety, counterfact=rome.load_counterfact(),
                           notes=prompting.load_notes())


DATA = _data()
NS = {"probes": DATA.probes, "skills": DATA.skills, "rq": DATA.rq, "safety": DATA.safety}


def _picks(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    out = []
    for i, src in _code(nb):
        tree = ast.parse(src)
        labels = _labels(tree)
        for node in ast.walk(tree):
            if _is_pick(node):
                kws = {k.arg: k.value for k in node.keywords}
                vals = {p: eval(compile(ast.Expression(kws[p]), path.name, "eval"), dict(NS)) for p in PROFILES if p in kws}
                out.append({"cell": i, "label": labels.get(id(node), f"cell {i}: {ast.unparse(node)[:60]}"),
                            "src": ast.unparse(node), "values": vals})
    return out


PICKS = {p.stem: _picks(p) for p in NOTEBOOKS}


def _picks_of(prefix: str) -> dict[str, list[dict]]:
    """The picks of every notebook whose name starts with ``prefix`` (05 and 04 are two notebooks each)."""
    return {nb: ps for nb, ps in PICKS.items() if nb.startswith(prefix)}


def _source(nb_prefix: str) -> str:
    nb = json.loads(next(p for p in NOTEBOOKS if p.name.startswith(nb_prefix)).read_text())
    return "\n".join(s for _, s in _code(nb))


def _output(nb_prefix: str) -> str:
    nb = json.loads(next(p for p in NOTEBOOKS if p.name.startswith(nb_prefix)).read_text())
    return "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def _pool_k(ratio: float, n: int) -> int:
    """replay examples coursekit.replay.mix adds to n task examples at share ``ratio``"""
    return round(ratio * n / (1 - ratio))


def _shares(v, n, pool):
    ks = [_pool_k(r, n) for r in v]
    bad = [f"share {r:g} -> {k} replay examples (pool {pool})" for r, k in zip(v, ks) if r > 0 and not 1 <= k <= pool]
    if len(set(ks)) != len(ks):
        bad.append(f"two shares give the same pool ({ks})")
    return not bad, "; ".join(bad)


def _known_facts() -> int:
    m = re.search(r"known: (\d+) / (\d+)", _output("04"))
    assert m, "notebook 04's committed output must print 'known: X / Y' (facts the model knows)"
    return int(m.group(1))


N_TASK = len(DATA.skills["task_train"])
OLD = load_old_abilities()
# (notebook, pick label, what must hold, check(value, the notebook's picks in this profile) -> ok or (ok, detail))
RULES = [
    ("01", "FamilyProbe(open_tokens=)", "open answers of >= 32 tokens (long enough that the foundation's are cut and "
     "terse ones visibly end by themselves)", lambda v, o: v >= 32),
    ("02", "EVERY", "a checkpoint every EVERY steps within STEPS", lambda v, o: 1 <= v <= o["STEPS"]),
    ("02", "N_OLD", "at least 50 old-ability instructions (one metric carries C6-C9), at most a half of the set",
     lambda v, o: 50 <= v <= min(len(OLD["fit"]), len(OLD["eval"]))),
    ("02", "SEEDS", "at least 3 seeds for every training run (the evidence standard)", lambda v, o: v >= 3),
    ("02", "LR_FULL", "at least 3 learning rates for the plain reference frontier", lambda v, o: len(set(v)) >= 3),
    ("02", "RANKS", "at least 3 LoRA ranks, none above the rank of q_proj/v_proj",
     lambda v, o: len(set(v)) >= 3 and max(v) <= min(SMALLEST_ADAPTED_DIM[m] for m in ("q_proj", "v_proj"))),
    ("03", "SWEEP", "every replay share of the 16 task examples adds >= 1 and <= the alignment pool",
     lambda v, o: _shares(v, N_TASK, len(DATA.skills["align"]))),
    ("03", "SAFETY_SWEEP", "every safety share adds >= 1 refusal and <= the refusal pool",
     lambda v, o: _shares(v, N_TASK, len(DATA.safety["harmful_train"]))),
    ("03", "N_GEN", "pseudo replay answers rq['questions'][:N_GEN]: N_GEN <= the questions there are",
     lambda v, o: 1 <= v <= len(DATA.rq["questions"])),
    ("04", "N_TRACE", "at least 10 traced facts, all of them known (the notebook traces recs[:N_TRACE])",
     lambda v, o: 10 <= v <= _known_facts()),
    ("04", "NOISE_RUNS", "at least 5 noise samples per traced fact", lambda v, o: v >= 5),
    ("04", "N_FT", "at least 10 fine-tuned edits, all of them known facts", lambda v, o: 10 <= v <= _known_facts()),
    ("04", "N_SEQ", "at least 20 sequential edits, all of them known facts", lambda v, o: 20 <= v <= _known_facts()),
    ("04", "N_SWEEP", "the layer sweep reuses the first edits", lambda v, o: 2 <= v <= _known_facts()),
    ("04", "N_PREFIX", "at least 5 sampled prefixes (ROME: 20), at most the prefix openings",
     lambda v, o: 5 <= v <= 20),
    ("04", "LAYER_STEP", "every layer or every second layer (the claim's bands need both parities covered)",
     lambda v, o: v in (1, 2)),
    ("04", "SWEEP", "sweep layers within the model's 30 layers", lambda v, o: all(0 <= x < 30 for x in v)),
]


def test_every_notebook_has_profile_sizes():
    """Sizes live in the notebook's picks or, once it reads the evidence store, in its plan (evidence/plan/)."""
    planned = {p.stem for p in (ROOT / "evidence" / "plan").glob("*.yaml")}
    empty = [p.name for p in NOTEBOOKS if not PICKS[p.stem] and p.stem not in planned]
    assert not empty, f"no P.pick(ci=…, full=…) at all in {empty}: give the full profile its GPU sizes"


def test_full_is_not_the_ci_size():
    same = [f"{nb} cell {p['cell']} {p['label']}: {p['src']}" for nb, ps in PICKS.items() for p in ps
            if p["values"].get("full") == p["values"].get("ci")]
    assert not same, "full repeats the ci size (use a GPU size, or a plain constant): " + "; ".join(same)


def test_every_rule_finds_its_pick():
    missing = [f"{nb} {label}" for nb, label, *_ in RULES
               if not any(p["label"] == label for ps in _picks_of(nb).values() for p in ps)]
    assert not missing, f"size rules whose pick is gone from the notebook (update RULES): {missing}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sizes_fit_their_data(profile):
    bad = []
    for prefix, label, what, ok in RULES:
        for nb, ps in _picks_of(prefix).items():
            picks = {p["label"]: p["values"][profile] for p in ps}
            if label not in picks:
                continue  # reported by test_every_rule_finds_its_pick
            v = picks[label]
            res = ok(v, picks)
            good, detail = res if isinstance(res, tuple) else (res, "")
            if not good:
                bad.append(f"{nb} {label}={v!r}: {what}" + (f" ({detail})" if detail else ""))
    assert not bad, f"{profile} profile: " + "; ".join(bad)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_notebooks_of_one_part_share_their_sizes(profile):
    """A size both notebooks of one lecture part pick (04 I/II) must agree: part II reuses part I's cached
    trace, covariance and edits only when the keys match."""
    bad = []
    for prefix in sorted({nb[:2] for nb in PICKS}):
        seen: dict = {}
        for nb, ps in _picks_of(prefix).items():
            for p in ps:
                v = p["values"].get(profile)
                if p["label"] in seen and seen[p["label"]][1] != v:
                    bad.append(f"{p['label']}: {seen[p['label']][0]} picks {seen[p['label']][1]!r}, {nb} picks {v!r}")
                seen.setdefault(p["label"], (nb, v))
    assert not bad, "; ".join(bad)


def test_pick_needs_every_profile():
    p = Profile(name="full", model="m", device="cpu")
    assert p.pick(ci=1, full=2) == 2
