"""Fast checks of coursekit.ttt: the hand-written losses, reset semantics, corruptions, the z-score reset."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from coursekit import CourseError, ttt


def test_fit_linear_matches_least_squares():
    x, y, _, _ = ttt.make_curve(50, 5, seed=1)
    w, b = ttt.fit_linear(x, y, steps=3000)
    assert np.allclose((w, b), np.polyfit(x, y, 1), atol=1e-5)


def test_neighbour_ttt_1d_beats_global_and_bad_k():
    xtr, ytr, xte, yte = ttt.make_curve(100, 20, seed=0)
    w, b = ttt.fit_linear(xtr, ytr)
    pred, lines = ttt.neighbour_ttt_1d(xtr, ytr, xte, k=8, start=(w, b))
    assert len(lines) == 20 and ttt.mse(pred, yte) < ttt.mse(w * xte + b, yte)
    with pytest.raises(CourseError, match="k must be"):
        ttt.neighbour_ttt_1d(xtr, ytr, xte, k=0)


def test_entropy_loss_matches_torch_distributions():
    logits = torch.randn(6, 10)
    ref = torch.distributions.Categorical(logits=logits).entropy().mean()
    assert torch.allclose(ttt.entropy_loss(logits), ref, atol=1e-6)
    assert torch.allclose(ttt.entropy_loss(torch.zeros(3, 4)), torch.tensor(math.log(4)), atol=1e-6)


def test_mcc_loss_known_answers():
    k = 10
    one_hot = torch.full((5, k), -1e4)
    one_hot[:, 3] = 1e4  # every view predicts class 3 with certainty
    assert float(ttt.mcc_loss(one_hot)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(5, k)
    assert float(ttt.mcc_loss(uniform)) == pytest.approx((k - 1) / k, abs=1e-6)
    # confident but disagreeing views are confused between classes -> larger than agreeing ones
    disagree = torch.full((2, k), -1e4)
    disagree[0, 1] = disagree[1, 2] = 1e4
    mixed = torch.full((2, k), 0.0)
    mixed[:, 1] = 5.0
    assert float(ttt.mcc_loss(mixed, temperature=1.0)) < (k - 1) / k
    assert float(ttt.mcc_loss(disagree)) == pytest.approx(0.0, abs=1e-6)  # each class only with itself


def test_suta_loss_is_weighted_sum():
    logits = torch.randn(5, 10)
    want = 0.3 * ttt.entropy_loss(logits, 2.5) + 0.7 * ttt.mcc_loss(logits, 2.5)
    assert torch.allclose(ttt.suta_loss(logits), want)


@pytest.mark.parametrize("name", list(ttt.CORRUPTIONS))
def test_corruption_shapes_range_and_severity(name):
    rng = np.random.default_rng(0)
    x = rng.random((7, 8, 8)).astype(np.float32)
    d = []
    for sev in (1, 5):
        y = ttt.corrupt(x, name, sev, seed=0)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert np.array_equal(y, ttt.corrupt(x, name, sev, seed=0))  # deterministic
        d.append(float(np.abs(y - x).mean()))
    assert d[1] > d[0]  # more severe -> further from the clean image


def test_corruption_bad_inputs_are_one_line():
    x = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(CourseError, match="unknown corruption 'fog'"):
        ttt.corrupt(x, "fog", 3)
    with pytest.raises(CourseError, match="severity must be"):
        ttt.corrupt(x, "noise", 6)
    with pytest.raises(CourseError, match="shape"):
        ttt.corrupt(np.zeros((8, 8)), "noise", 1)


def _small_model():
    torch.manual_seed(0)
    return ttt.DigitNet(width=4).eval()


def _unchanged(m, before) -> bool:
    # num_batches_tracked is a counter; the running statistics themselves must not move
    return all(torch.equal(v, before[k]) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked"))


def _stream(n_per=3, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.random((40, 8, 8)).astype(np.float32), rng.integers(0, 10, 40)
    return ttt.make_stream(x, y, ["noise", "blur"], cycles=2, utterance=4, segment=(n_per, n_per), seed=seed)


def test_tta_methods_hand_the_source_weights_back():
    m = _small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    for method in ttt.TTA_METHODS:
        lp = ttt.tta(m, x, method, lr=1e-2, steps=2, batch_size=3)
        assert lp.shape == (6, 10) and np.allclose(np.exp(lp).sum(1), 1, atol=1e-5)
        assert _unchanged(m, before), f"{method} must reset the weights"
    with pytest.raises(CourseError, match="unknown adaptation"):
        ttt.tta(m, x, "magic")


def test_continual_methods_reset_and_differ_where_they_should():
    m = _small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    st = _stream()
    runs = {meth: ttt.continual(m, st, meth, lr=0.05, steps=2, buffer=2, period=4, warmup=1, n_fit=2)
            for meth in ttt.CONTINUAL}
    assert _unchanged(m, before), "continual() hands the source weights back"
    for r in runs.values():
        assert r.correct.shape == st.y.shape == r.logp.shape and (r.logp <= 0).all()
    assert runs["oracle_reset"].resets == st.boundaries
    assert runs["periodic_reset"].resets == list(range(4, len(st.x), 4))
    assert not runs["episodic"].resets and not runs["no_reset"].resets
    # no reset keeps what it learned, episodic starts from the source weights each time
    assert not np.allclose(runs["no_reset"].logp, runs["episodic"].logp)
    with pytest.raises(CourseError, match="unknown continual method"):
        ttt.continual(m, st, "forever")


def test_stream_schedule_is_shared_across_seeds_and_has_no_period():
    a, b = _stream(seed=0), ttt.make_stream(np.random.default_rng(1).random((40, 8, 8)).astype(np.float32),
                                            np.arange(40) % 10, ["noise", "blur"], cycles=2, utterance=4,
                                            segment=(3, 3), seed=1, schedule_seed=0)
    assert a.domains == b.domains and a.boundaries == b.boundaries  # same schedule, other images
    assert not np.array_equal(a.x, b.x)
    assert a.x.shape == (12, 4, 8, 8) and a.boundaries == [3, 6, 9]
    assert all(a.domains[i] != a.domains[i - 1] for i in a.boundaries)
    varied = ttt.make_stream(np.zeros((20, 8, 8), np.float32), np.zeros(20, int), list(ttt.CORRUPTIONS), cycles=2,
                             utterance=2, segment=(2, 9), seed=3)
    assert len(set(np.diff([0, *varied.boundaries]))) > 1, "segment lengths vary, so no period fits the boundaries"
    with pytest.raises(CourseError, match="make_stream"):
        ttt.make_stream(np.zeros((20, 8, 8)), np.zeros(20, int), ["noise"], segment=(5, 2))


def test_reset_timing_counts_delays_and_false_alarms():
    t = ttt.reset_timing([2, 5, 11, 12, 25], boundaries=[10, 20], n=30)
    assert t["delays"] == [1, 5] and t["detected"] == 1.0 and t["false_alarms"] == 3  # 2, 5 before any boundary; 12
    assert ttt.reset_timing([], [10], 20) == {"detected": 0.0, "delays": [], "false_alarms": 0}


def test_choose_lr_on_a_known_curve():
    best, scores = ttt.choose_lr(lambda lr: -(math.log10(lr) + 2) ** 2, [1e-3, 1e-2, 1e-1])
    assert best == pytest.approx(1e-2) and len(scores) == 3
    assert ttt.choose_lr(lambda lr: 1.0, [0.1, 0.01])[0] == pytest.approx(0.01)  # ties: the smaller rate
    near = {0.001: 0.60, 0.01: 0.604, 0.1: 0.58}
    assert ttt.choose_lr(near.get, near)[0] == 0.001                  # within tol of the best: a tie
    assert ttt.choose_lr(near.get, near, tol=0.0)[0] == 0.01
    with pytest.raises(CourseError):
        ttt.choose_lr(lambda lr: 0.0, [])


def test_digits_split_parts_are_disjoint():
    x_tr, _, x_tu, _, x_te, _ = ttt.digits_split(n_test=500, n_tune=300, seed=0)
    rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
    assert len(x_tu) == 300 and len(x_te) == 500
    # sklearn's digits contain a few exact duplicate images; no *index* is shared, and almost no image
    assert len(rows(x_te) & rows(x_tu)) + len(rows(x_te) & rows(x_tr)) + len(rows(x_tu) & rows(x_tr)) < 10
    with pytest.raises(CourseError, match="n_test and n_tune"):
        ttt.digits_split(n_test=1000, n_tune=500)


def test_reset_object_restores():
    m = _small_model()
    params = ttt.suta_params(m)
    r = ttt.Reset(params)
    opt = torch.optim.SGD(params, lr=0.1)
    ttt.set_bn(m, True)
    loss = ttt.suta_loss(m(ttt._t(torch.rand(4, 1, 8, 8))))
    loss.backward()
    opt.step()
    assert any(not torch.equal(p, s) for p, s in zip(params, r.saved))
    r()
    assert all(torch.equal(p, s) for p, s in zip(params, r.saved))


def test_zscore_reset_fires_after_patience():
    z = ttt.ZScoreReset(n_fit=4, threshold=2.0, patience=2, two_sided=False)
    for g in (0.0, 1.0, 0.0, 1.0):
        assert not z.update(g)  # fitting: mean 0.5, sample std 0.577
    assert not z.fitting and z.mu == pytest.approx(0.5) and z.sd == pytest.approx(math.sqrt(1 / 3), abs=1e-6)
    assert not z.update(0.6)             # z = 0.17
    assert not z.update(2.0)             # z = 2.6, first hit
    assert z.update(2.0)                 # second consecutive hit -> reset
    assert z.fitting                     # and it starts fitting again
    one = ttt.ZScoreReset(n_fit=2, threshold=2.0, patience=2, two_sided=False)
    one.update(0.0); one.update(1.0)
    assert not one.update(-5.0) and not one.update(-5.0)  # a fall is ignored one-sided
    two = ttt.ZScoreReset(n_fit=2, threshold=2.0, patience=2)
    two.update(0.0); two.update(1.0)
    assert not two.update(-5.0) and two.update(-5.0)
    with pytest.raises(CourseError):
        ttt.ZScoreReset(n_fit=1)


def test_rotations_shapes():
    xs, ys = ttt.rotations(torch.rand(2, 1, 8, 8))
    assert xs.shape == (8, 1, 8, 8) and ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_nearest_is_cosine_and_ordered():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert ttt.nearest(np.array([1.0, 0.1]), pool, 2) == [0, 2]
    with pytest.raises(CourseError, match="k must be"):
        ttt.nearest(np.array([1.0, 0.0]), pool, 4)


def test_passages_file_and_bad_passages(tmp_path):
    train, test = ttt.load_passages()
    assert len(train) >= 20 and len(test) >= 4
    assert {p["topic"] for p in test} <= {p["topic"] for p in train}
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"id": "a", "topic": "t", "split": "dev", "text": "x"}) + "\n")
    with pytest.raises(CourseError, match="field 'split'"):
        ttt.load_passages(str(bad))
    bad.write_text(json.dumps({"id": "a", "topic": "t", "split": "train", "text": ""}) + "\n")
    with pytest.raises(CourseError, match="field 'text'"):
        ttt.load_passages(str(bad))


def test_neighbour_ttt_lowers_loss_resets_and_equals_a_fresh_optimizer(tiny):
    model, tok = tiny
    text, other = "the salt of Korvenna is grey", "ringball is played with a hoop"
    before = ttt.perplexity(model, tok, text)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    run = ttt.NeighbourTTT(model, tok, lr=1e-2)
    first = run(text, [text, other])
    assert first < before
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "weights reset after each input"
    run(other, [other, other])                      # leaves optimizer state behind ...
    assert run(text, [text, other]) == pytest.approx(first, rel=1e-5)   # ... which is zeroed: same as fresh
    with pytest.raises(CourseError, match="at least one neighbour"):
        run(text, [])


def test_leave_one_out_and_other_topic_control():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert ttt.leave_one_out(emb, 0, 2) == [1, 3]
    assert 0 not in ttt.leave_one_out(emb, 0, 3)
    topics = ["a", "a", "b", "b"]
    rng = np.random.default_rng(0)
    for i in range(4):
        assert all(topics[j] != topics[i] for j in ttt.other_topic(topics, i, 2, rng))
    with pytest.raises(CourseError, match="other topics"):
        ttt.other_topic(topics, 0, 3, rng)


def test_helpers():
    assert np.allclose(ttt.rolling([1, 0, 1, 1], 2), [1, 0.5, 0.5, 1])
    assert ttt.top_class_share(np.array([1, 1, 1, 2])) == 0.75
