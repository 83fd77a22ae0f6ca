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


def test_episodic_methods_reset_weights():
    m = _small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    ttt.suta(m, x, steps=2, lr=1e-2, progress=False)
    ttt.rotation_ttt(m, x, steps=2, lr=1e-2, progress=False)
    ttt.tent(m, x, batch_size=2, lr=1e-2)
    for k, v in m.state_dict().items():
        if k.endswith("num_batches_tracked"):  # a counter; the running statistics themselves must not move
            continue
        assert torch.equal(v, before[k]), f"{k} changed: episodic TTT must reset"
    r = ttt.continual(m, x, np.zeros(3, int), "no_reset", steps=2, lr=1e-2, progress=False)
    assert r.preds.shape == (3,)
    for k, v in m.state_dict().items():  # continual() hands the source weights back too
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, before[k])


def test_reset_object_restores_and_no_reset_drifts():
    m = _small_model()
    params = ttt.suta_params(m)
    r = ttt.Reset(params)
    opt = torch.optim.SGD(params, lr=0.1)
    loss = ttt.suta_loss(m(ttt.views(torch.rand(1, 8, 8))))
    loss.backward()
    opt.step()
    assert any(not torch.equal(p, s) for p, s in zip(params, r.saved))
    r()
    assert all(torch.equal(p, s) for p, s in zip(params, r.saved))


def test_continual_bad_method():
    with pytest.raises(CourseError, match="unknown continual method"):
        ttt.continual(_small_model(), np.zeros((1, 8, 8), np.float32), np.zeros(1, int), "forever")


def test_zscore_reset_fires_after_patience():
    z = ttt.ZScoreReset(n_fit=4, threshold=2.0, patience=2)
    assert not z.update([0.0, 1.0]) and not z.update([0.0, 1.0])  # fitting: mean 0.5, std 0.5
    assert z.mu == pytest.approx(0.5) and z.sd == pytest.approx(0.5, abs=1e-6)
    assert not z.update([0.6])           # z = 0.2
    assert not z.update([2.0])           # z = 3, first hit
    assert z.update([2.0])               # second consecutive hit -> reset
    assert z.mu is None                  # and it starts fitting again
    one = ttt.ZScoreReset(n_fit=2, threshold=2.0, patience=2)
    one.update([0.0, 1.0])
    assert not one.update([-5.0]) and not one.update([-5.0])  # a fall is ignored one-sided
    two = ttt.ZScoreReset(n_fit=2, threshold=2.0, patience=2, two_sided=True)
    two.update([0.0, 1.0])
    assert not two.update([-5.0]) and two.update([-5.0])
    with pytest.raises(CourseError):
        ttt.ZScoreReset(n_fit=1)


def test_views_and_rotations_shapes():
    x = torch.rand(1, 8, 8)
    assert ttt.views(x).shape == (5, 1, 8, 8)
    xs, ys = ttt.rotations(torch.rand(2, 1, 8, 8))
    assert xs.shape == (8, 1, 8, 8) and ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(CourseError, match="one image"):
        ttt.views(torch.rand(2, 8, 8))


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


def test_lm_neighbour_ttt_lowers_loss_on_tiny_model(tiny):
    model, tok = tiny
    text = "the salt of Korvenna is grey"
    before = ttt.perplexity(model, tok, text)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    after = ttt.lm_neighbour_ttt(model, tok, text, [text, text], lr=1e-2)
    assert after < before
    model.load_state_dict(snap)
    with pytest.raises(CourseError, match="at least one neighbour"):
        ttt.lm_neighbour_ttt(model, tok, text, [])


def test_helpers():
    assert np.allclose(ttt.rolling([1, 0, 1, 1], 2), [1, 0.5, 0.5, 1])
    assert ttt.top_class_share(np.array([1, 1, 1, 2])) == 0.75
