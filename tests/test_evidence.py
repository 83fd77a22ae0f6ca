"""The evidence layer: the interval routine on distributions with a known answer, verdicts, the ledger."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from coursekit import evidence as ev
from coursekit import store
from coursekit.errors import CourseError
from coursekit.results import read_results, record


def test_one_seed_is_the_t_interval_over_items():
    x = np.random.default_rng(0).normal(1.0, 2.0, 40)
    est, lo, hi = ev.interval(x)
    lo_t, hi_t = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert est == pytest.approx(x.mean()) and lo == pytest.approx(lo_t) and hi == pytest.approx(hi_t)


def test_one_item_is_the_t_interval_over_seeds():
    x = np.array([[0.3], [0.5], [0.4], [0.9]])
    _, lo, hi = ev.interval(x)
    lo_t, hi_t = stats.t.interval(0.95, 3, loc=x.mean(), scale=stats.sem(x.ravel()))
    assert (lo, hi) == pytest.approx((lo_t, hi_t))


def test_constant_values_have_zero_width_and_a_shift_moves_the_interval():
    assert ev.interval(np.full((3, 10), 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    x = np.random.default_rng(1).normal(0, 1, (3, 30))
    a, b = ev.interval(x), ev.interval(x + 5)
    assert b == pytest.approx(tuple(v + 5 for v in a))


def test_crossed_design_standard_error_matches_the_variance_components():
    """Seeds x items with known components: SE^2 = s_a^2/S + s_b^2/I + s_e^2/(S I) on a large table."""
    rng = np.random.default_rng(2)
    S, I, sa, sb, se = 40, 400, 0.5, 1.0, 0.3
    x = rng.normal(0, sa, (S, 1)) + rng.normal(0, sb, (1, I)) + rng.normal(0, se, (S, I))
    _, got, _ = ev.standard_error(x)
    want = math.sqrt(sa**2 / S + sb**2 / I + se**2 / (S * I))
    assert got == pytest.approx(want, rel=0.15)


@pytest.mark.parametrize("sa,sb", [(0.0, 1.0), (0.5, 0.5), (1.0, 0.2)])
def test_coverage_with_three_seeds_is_about_95_percent(sa, sb):
    """The design the course uses (3 seeds x 50 items): the interval covers the true mean ~95% of the time,
    also when seed-to-seed variation dominates (where a bootstrap over 3 seeds would under-cover)."""
    rng = np.random.default_rng(3)
    hits, n = 0, 600
    for _ in range(n):
        x = 0.7 + rng.normal(0, sa, (3, 1)) + rng.normal(0, sb, (1, 50)) + rng.normal(0, 0.3, (3, 50))
        _, lo, hi = ev.interval(x)
        hits += lo <= 0.7 <= hi
    assert 0.91 <= hits / n <= 0.99


def test_bad_values_are_one_line_errors():
    with pytest.raises(CourseError, match="NaN"):
        ev.interval([1.0, float("nan"), 2.0])
    with pytest.raises(CourseError, match="one seed and one item"):
        ev.interval([[1.0]])
    with pytest.raises(CourseError, match="direction"):
        ev.verdict(0, 1, "up")
    with pytest.raises(CourseError, match="unknown claim"):
        ev.claim("C99", ev.effect("x", [1, 2, 3], "greater"))


def test_verdicts_follow_the_interval_in_the_lectures_direction():
    assert ev.verdict(0.1, 0.3, "greater") == "reproduced"
    assert ev.verdict(-0.1, 0.3, "greater") == "inconclusive"
    assert ev.verdict(-0.3, -0.1, "greater") == "opposite"
    assert ev.verdict(-0.3, -0.1, "less") == "reproduced"
    assert ev.verdict(0.2, 0.4, "less", null=0.5) == "reproduced"
    # a strength the claim needs (C7: r = -0.72 against a claimed -0.8 is weaker than claimed, not opposite)
    assert ev.verdict(-0.85, -0.6, "less", strength=-0.8) == "weaker than claimed"
    assert ev.verdict(-0.95, -0.85, "less", strength=-0.8) == "reproduced"
    assert ev.verdict(-0.3, 0.1, "less", strength=-0.8) == "inconclusive"
    assert ev.verdict(0.1, 0.3, "less", strength=-0.8) == "opposite"
    with pytest.raises(CourseError, match="strength"):
        ev.verdict(0.1, 0.3, "greater", strength=-1)
    up = ev.effect("gain", [0.5, 0.6, 0.7, 0.4], "greater")
    flat = ev.effect("flat", [-0.5, 0.6, 0.1, -0.2], "greater")
    down = ev.effect("loss", [0.5, 0.6, 0.7, 0.4], "less")
    assert up.holds() and not flat.holds() and not down.holds()
    assert ev.claim("C0", up).verdict == "reproduced"
    assert ev.claim("C0", up, flat).verdict == "inconclusive"
    assert ev.claim("C0", up, flat, down).verdict == "opposite"
    weak = ev.effect("weak", [0.5, 0.6, 0.7, 0.4], "greater", strength=2)
    assert weak.verdict == "weaker than claimed" and not weak.holds() and "claimed > 2" in weak.line()
    assert ev.claim("C0", up, weak).verdict == "weaker than claimed"
    assert ev.claim("C0", up, weak, flat).verdict == "inconclusive"


def test_over_seeds_stacks_per_item_values():
    import random

    out = ev.over_seeds(lambda s: {"a": [random.random() for _ in range(4)], "b": [s] * 4}, seeds=3, progress=False)
    assert out["a"].shape == (3, 4) and out["b"][:, 0].tolist() == [0, 1, 2] and out["seeds"].tolist() == [0, 1, 2]
    again = ev.over_seeds(lambda s: {"a": [random.random() for _ in range(4)], "b": [s] * 4}, seeds=3, progress=False)
    assert np.array_equal(out["a"], again["a"])  # the seed drives the randomness
    with pytest.raises(CourseError, match="different number of items"):
        ev.over_seeds(lambda s: [0.0] * (s + 1), seeds=2, progress=False)


def test_claims_travel_in_the_results_line_and_the_ledger(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSEKIT_EVIDENCE_DIR", str(tmp_path / "empty-store"))  # claims no plan holds yet
    c = ev.claim("C0", ev.effect("rag_reliability", np.linspace(0.1, 0.9, 40), "greater", what="margin gain"))
    record("00_test", {"x": 1.0}, claims=[c])
    line = capsys.readouterr().out.strip()
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": line + "\n"}]}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    res = read_results(path)
    assert res[0]["claims"][0]["id"] == "C0" and res[0]["claims"][0]["verdict"] == "reproduced"
    text = store.ledger(res)
    rows = {l.split()[0]: l for l in text.splitlines()[2:] if l[:1] == "C"}
    assert "reproduced" in rows["C0"] and "not measured" in rows["C1"] and len(rows) == len(ev.CLAIMS)
    assert "not yet in the evidence store" in text
    assert "rag_reliability" in text and "40" in text


def test_a_stale_build_does_not_hide_newer_committed_notebooks(tmp_path):
    """`course claims` reads build/executed only if `make course` ran after every notebook last changed."""
    import os

    from coursekit.course import default_paths

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "build" / "executed").mkdir(parents=True)
    nb, ex = tmp_path / "notebooks" / "00_a.ipynb", tmp_path / "build" / "executed" / "00_a.ipynb"
    nb.write_text("{}")
    paths, source = default_paths(tmp_path)
    assert paths == [nb] and "committed" in source  # no build yet
    ex.write_text("{}")
    os.utime(ex, (nb.stat().st_mtime - 60,) * 2)
    paths, source = default_paths(tmp_path)
    assert paths == [nb] and "older than 00_a.ipynb" in source  # built, then the notebook changed
    os.utime(ex, (nb.stat().st_mtime + 60,) * 2)
    paths, source = default_paths(tmp_path)
    assert paths == [ex] and "make course" in source


def test_plot_effects_draws_one_row_per_effect():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effects = [ev.effect("a_b", [[1.0, 2.0, 3.0]] * 3, "greater"), ev.effect("c", [[-1.0, 0.0, 0.5]] * 3, "less", null=1)]
    fig, ax = plt.subplots()
    ev.plot_effects(ax, effects, "t")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a b", "c"] and ax.get_title() == "t"
    plt.close(fig)
