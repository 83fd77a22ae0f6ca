"""Fast tests for coursekit.regularization: the hand-written penalty R = Σ λ_j (θ_j − θ_j⁰)², the diagonal
Fisher, Pearson, matched-learning interpolation, the run cache, and one-line errors for bad input."""
from __future__ import annotations

import math

import pytest

from coursekit import CourseError
from coursekit import regularization as rg

PROMPT = "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"


def _nudge(model, scale=0.01, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_l2sp_zero_at_anchor_and_hand_formula(tiny):
    model, _ = tiny
    theta0 = rg.anchor(model)
    assert rg.l2sp(theta0, 3.0)(model).item() == 0.0
    _nudge(model)
    want = 3.0 * sum(((p.detach() - theta0[n]) ** 2).sum().item() for n, p in model.named_parameters())
    assert rg.l2sp(theta0, 3.0)(model).item() == pytest.approx(want, rel=1e-5)


def test_ewc_equals_hand_formula(tiny):
    import torch

    model, _ = tiny
    theta0 = rg.anchor(model)
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    _nudge(model)
    mean = sum(f.sum().item() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    want = 0.5 * sum((fisher[n] / mean * (p.detach() - theta0[n]) ** 2).sum().item()
                     for n, p in model.named_parameters())
    got = rg.ewc(theta0, fisher, 0.5)(model)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # it is differentiable and its gradient is 2 λ_j (θ_j − θ_j⁰)
    got.backward()
    n, p = next(iter(model.named_parameters()))
    assert torch.allclose(p.grad, 2 * 0.5 * fisher[n] / mean * (p.detach() - theta0[n]), rtol=1e-4, atol=1e-9)


def test_fisher_shapes_and_nonnegative(tiny):
    model, tok = tiny
    f = rg.diag_fisher(model, tok, [PROMPT, PROMPT], ["Fine, thanks.", "Good."], progress=False)
    names = [n for n, p in model.named_parameters()]
    assert set(f) == set(names)
    for n, p in model.named_parameters():
        assert f[n].shape == p.shape
        assert (f[n] >= 0).all()
    assert sum(v.sum().item() for v in f.values()) > 0
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_pearson_known_values():
    import numpy as np

    assert rg.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert rg.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    x, y = [0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 0.3, 0.8, 0.1, 0.6]
    assert rg.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)


def test_at_matched_interpolates():
    pts = [dict(step=0, skill=0.0, forgetting=0.0), dict(step=4, skill=0.5, forgetting=0.2),
           dict(step=8, skill=1.0, forgetting=0.6)]
    assert rg.at_matched(pts, 0.75) == pytest.approx(0.4)
    assert rg.at_matched(pts, 0.5) == pytest.approx(0.2)
    assert rg.at_matched(pts, 1.5) is None


def test_dropout_hooks_only_in_training(tiny):
    import torch

    model, tok = tiny
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with rg.dropout_hooks(model, 0.5) as n:
            assert n == 4  # 2 layers x (attention, MLP)
            same = model(input_ids=ids).logits  # eval mode: no dropout
            model.train()
            torch.manual_seed(0)
            noisy = model(input_ids=ids).logits
            model.eval()
        after = model(input_ids=ids).logits
    assert torch.equal(ref, same) and torch.equal(ref, after)
    assert not torch.allclose(ref, noisy)


def test_run_cache_roundtrip(tiny, tmp_cache):
    model, _ = tiny
    calls = []

    def run():
        calls.append(1)
        return {"x": len(calls)}

    out = rg.RunCache("t", weights=model).get_or_run(["a", 1], run)
    again = rg.RunCache("t", weights=model).get_or_run(["a", 1], run)
    assert out == again == {"x": 1} and calls == [1]
    rg.RunCache("t", weights=model).get_or_run(["a", 2], run)  # other configuration: runs
    rg.RunCache("t").get_or_run(["a", 1], run)  # other starting weights (none given): runs
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("cfg,match", [
    ({"name": "x", "method": "qlora", "lr": 1e-3}, "method"),
    ({"name": "x", "method": "lora", "r": 0, "lr": 1e-3}, "rank"),
    ({"name": "x", "lr": -1}, "lr"),
    ({"name": "x", "lr": 1e-4, "reg": "l1"}, "reg"),
    ({"name": "x", "lr": 1e-4, "reg": "l2sp", "lam": -2}, "lam"),
    ({"name": "x", "lr": 1e-4, "dropout": 1.5}, "dropout"),
    ({"lr": 1e-4}, "name"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(CourseError, match=match):
        rg.check_config(cfg)


def test_bad_inputs(tiny):
    import torch

    model, tok = tiny
    theta0 = rg.anchor(model)
    with pytest.raises(CourseError, match="lam"):
        rg.l2sp(theta0, float("nan"))
    with pytest.raises(CourseError, match="shape"):
        rg.ewc(theta0, {next(iter(theta0)): torch.ones(3)}, 1.0)
    with pytest.raises(CourseError, match="zeros"):
        rg.ewc(theta0, {n: torch.zeros_like(t) for n, t in theta0.items()}, 1.0)
    with pytest.raises(CourseError, match="none of its parameters"):
        rg.l2sp({"nope": torch.zeros(1)}, 1.0)(model)
    with pytest.raises(CourseError, match="answers"):
        rg.diag_fisher(model, tok, [PROMPT], [], progress=False)
    with pytest.raises(CourseError, match="constant"):
        rg.pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(CourseError, match="equally long"):
        rg.pearson([1, 2], [1])
    with pytest.raises(CourseError, match="dropout"):
        with rg.dropout_hooks(model, 2):
            pass
    with pytest.raises(CourseError, match="example 0"):
        rg.NewSkill.from_examples([{"prompt": "p"}])
