"""Fast tests for coursekit.regularization: the hand-written penalty R = Σ λ_j (θ_j − θ_j⁰)², the diagonal
Fisher, Pearson and Spearman with their interval, matched learning on the dense frontier, the λ rule, weight
decay toward the foundation weights, the cached runs, and one-line errors for bad input."""
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


def _pt(loss, forgetting):
    return {"loss": [loss, loss], "forgetting": [forgetting, forgetting + 0.2]}


def test_frontier_at_interpolates_per_item_and_takes_the_least_forgetting_run():
    slow = [_pt(3.0, 0.0), _pt(2.0, 0.4), _pt(1.0, 1.0)]
    fast = [_pt(3.0, 0.0), _pt(1.0, 0.6)]  # reaches loss 2.0 at forgetting 0.3 (+0.2 on item 2)
    assert rg.frontier_at([slow], 1.5) == pytest.approx([0.7, 0.9])
    assert rg.frontier_at([slow, fast], 2.0) == pytest.approx([0.3, 0.5])
    assert rg.frontier_at([slow, fast], 0.5) is None and rg.frontier_at([slow], 3.5) is None
    assert rg.excess(_pt(2.0, 0.5), [slow, fast]) == pytest.approx([0.2, 0.2])
    assert rg.excess(_pt(0.2, 0.5), [slow, fast]) is None
    rows = rg.excess_table([_pt(2.0, 0.5), _pt(0.2, 0.5)], [[slow, fast], [slow, fast]])
    assert len(rows) == 1 and rows[0] == pytest.approx([0.2, 0.2])


def test_choose_lambda_least_forgetting_per_nat_learned():
    start = {"loss": [3.0], "forgetting": [0.0]}
    sweep = {1.0: {"loss": [1.0], "forgetting": [1.0]},    # 0.5 per nat
             10.0: {"loss": [2.0], "forgetting": [0.2]},   # 0.2 per nat
             100.0: {"loss": [3.1], "forgetting": [0.0]}}  # learned nothing: skipped
    assert rg.choose_lambda(sweep, start) == 10.0
    with pytest.raises(CourseError, match="learned anything"):
        rg.choose_lambda({100.0: sweep[100.0]}, start)


def test_spearman_and_ranks_match_scipy():
    from scipy import stats

    x, y = [0.1, 0.5, 0.5, 0.9, 0.4, 0.2], [1.0, 0.3, 0.8, 0.1, 0.6, 0.6]
    assert rg.ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    assert rg.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-9)


def test_correlation_effect_interval_over_seeds_in_z():
    import numpy as np
    from scipy import stats

    rs = [-0.95, -0.9, -0.97]
    e = rg.correlation_effect("r", rs, -0.8, points=10)
    z = np.arctanh(rs)
    half = stats.t.ppf(0.975, 2) * z.std(ddof=1) / np.sqrt(3)
    assert e.estimate == pytest.approx(np.tanh(z.mean()))
    assert (e.low, e.high) == pytest.approx((np.tanh(z.mean() - half), np.tanh(z.mean() + half)))
    assert e.seeds == 3 and e.items == 10 and e.null == -0.8
    assert e.verdict == ("reproduced" if e.high < -0.8 else "inconclusive")
    assert rg.correlation_effect("r", [0.5, 0.6, 0.55], -0.8, points=10).verdict == "opposite"


def test_sketch_distance_estimates_the_weight_distance(tiny):
    model, _ = tiny
    theta0 = rg.anchor(model)
    assert rg.distance(rg.sketch(model, theta0)) == 0.0
    _nudge(model, scale=0.01)
    true = math.sqrt(sum(((p.detach() - theta0[n]) ** 2).sum().item() for n, p in model.named_parameters()))
    a = rg.sketch(model, theta0)
    assert len(a) == sum(-(-p.numel() // rg.SKETCH_STRIDE) for p in model.parameters())
    assert rg.distance(a) == pytest.approx(true, rel=0.5)  # a 1-in-9973 sample of a tiny model: rough
    assert rg.distance(a, a) == 0.0
    with pytest.raises(CourseError, match="different models"):
        rg.distance(a, a[:-1])


def test_decay_toward_start_is_decoupled_decay_of_the_change(tok):
    """train(weight_decay=wd, decay_toward=θ⁰) = Adam's update plus θ ← θ − lr·wd·(θ − θ⁰) each step,
    checked against plain Adam with that decay written out; toward zeros it is AdamW's usual decay."""
    import torch

    from conftest import make_tiny_llama
    from coursekit import finetune

    ex = [finetune.sft_example(tok, "Who?", "Me.")]
    lr, wd = 1e-2, 20.0
    start = make_tiny_llama(tok)
    theta0 = {n: p.detach().clone() for n, p in start.named_parameters()}
    got = finetune.train(make_tiny_llama(tok), tok, ex, steps=3, lr=lr, batch_size=1, weight_decay=wd,
                         decay_toward=theta0, progress=False)[0]
    ref = make_tiny_llama(tok)
    ref.train()
    opt = torch.optim.Adam(ref.parameters(), lr=lr, foreach=False)
    for _ in range(3):
        finetune.completion_loss(ref, finetune.collate(tok, ex)).backward()
        with torch.no_grad():
            pull = {n: lr * wd * (p - theta0[n]) for n, p in ref.named_parameters()}
        opt.step()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.sub_(pull[n])
        opt.zero_grad()
    for (n, a), b in zip(got.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    zeros = {n: torch.zeros_like(t) for n, t in theta0.items()}
    to_zero = finetune.train(make_tiny_llama(tok), tok, ex, steps=3, lr=lr, batch_size=1, weight_decay=wd,
                             decay_toward=zeros, progress=False)[0]
    usual = finetune.train(make_tiny_llama(tok), tok, ex, steps=3, lr=lr, batch_size=1, weight_decay=wd,
                           progress=False)[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(to_zero.parameters(), usual.parameters()))
    with pytest.raises(CourseError, match="decay_toward"):
        finetune.train(make_tiny_llama(tok), tok, ex, steps=1, lr=lr, weight_decay=wd, decay_toward={},
                       progress=False)


def test_runs_measure_every_step_cache_and_restore(tiny, tmp_cache):
    import torch

    from coursekit import finetune
    from coursekit.abilities import OldAbilities

    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = [finetune.sft_example(tok, "Who?", "Me."), finetune.sft_example(tok, "Where?", "Here.")]
    old = OldAbilities.build(model, tok, ["Name a colour.", "Say hi.", "Count to three."], max_new_tokens=6,
                             answer_tokens=4, progress=False)
    assert all(len(a) <= 4 for a in old.answers)
    probe = rg.Probe.build([finetune.sft_example(tok, "Why?", "Because.")], old)
    runs = rg.Runs(model, tok, ex, steps=2, batch_size=2, fisher_data=(old.prompts, ["Red.", "Hi.", "One, two."]),
                   progress=False)
    start = runs.start(probe)
    assert start["step"] == 0 and max(abs(f) for f in start["forgetting"]) < 1e-5
    out = runs({"name": "ft", "lr": 1e-2}, 0, probe)
    assert [p["step"] for p in out["points"]] == [1, 2] and len(out["points"][0]["forgetting"]) == 3
    assert rg.distance(out["sketch"]) > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the foundation is back
    assert runs({"name": "ft", "lr": 1e-2}, 0, probe) == out  # from the cache
    assert [p["step"] for p in runs({"name": "ft", "lr": 1e-2}, 0, probe, every=2)["points"]] == [2]
    ewc_run = runs({"name": "ewc", "lr": 1e-2, "reg": "ewc", "lam": 1.0}, 1, probe)
    lora_run = runs({"name": "lora", "method": "lora", "r": 2, "alpha": 4, "rslora": True, "lr": 1e-2}, 0, probe)
    assert ewc_run["points"] and lora_run["points"]
    with pytest.raises(CourseError, match="every"):
        runs({"name": "ft", "lr": 1e-2}, 0, probe, every=3)


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


@pytest.mark.parametrize("cfg,match", [
    ({"name": "x", "method": "qlora", "lr": 1e-3}, "method"),
    ({"name": "x", "method": "lora", "r": 0, "lr": 1e-3}, "rank"),
    ({"name": "x", "lr": -1}, "lr"),
    ({"name": "x", "lr": 1e-4, "reg": "l1"}, "reg"),
    ({"name": "x", "lr": 1e-4, "reg": "l2sp", "lam": -2}, "lam"),
    ({"name": "x", "lr": 1e-4, "dropout": 1.5}, "dropout"),
    ({"lr": 1e-4}, "name"),
    ({"name": "x", "lr": 1e-4, "decay": "half"}, "decay"),
    ({"name": "x", "method": "lora", "r": 4, "lr": 1e-3, "weight_decay": 0.1}, "only wired"),
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
        rg.Probe.build([{"prompt": "p"}], None)
    with pytest.raises(CourseError, match="steps"):
        rg.Runs(model, tok, [{"prompt": "p", "completion": "c"}], steps=0)


def test_emotion_task_held_out_sentences_are_never_trained_on(tok):
    train, held = rg.emotion_task(tok)
    assert len(train) == 16 and len(held) >= 30
    norm = lambda e: " ".join(e["prompt"].lower().split())  # noqa: E731
    assert not {norm(e) for e in train} & {norm(e) for e in held}
    assert len({norm(e) for e in held}) == len(held)
