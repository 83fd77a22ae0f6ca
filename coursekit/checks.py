"""Checks a student calls after each exercise: one line that says what is wrong, or a ✓.

Each check runs the student's function on small inputs with known answers (fixed seeds, no model
file) and compares with coursekit's own implementation — the same code the notebooks use — then
diagnoses the usual mistakes (wrong shape, flipped sign, a missing term, a missing mask).

    ck.checks.check_task_vector(task_vector)      # ✓ task_vector: 3 checks passed
"""
from __future__ import annotations

import math
from typing import Callable

from .errors import CourseError


class CheckFailed(CourseError):
    """A student's function gave a wrong answer; the message says how."""


def _call(name: str, fn: Callable, *args, **kwargs):
    if not callable(fn):
        raise CheckFailed(f"{name}: pass the function itself, e.g. check_{name}({name})")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{name}: not implemented yet — replace `raise NotImplementedError` with your code") from None
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"{name}: your function raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _ok(name: str, n: int) -> None:
    print(f"✓ {name}: {n} checks passed")


def _close(a, b, tol=1e-5) -> bool:
    import torch

    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=tol))


def _scalar(name: str, x) -> float:
    import torch

    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise CheckFailed(f"{name}: must return a single number (got a tensor of shape {tuple(x.shape)}); "
                              f"did you forget to average?")
        return float(x.detach())
    try:
        return float(x)
    except (TypeError, ValueError):
        raise CheckFailed(f"{name}: must return a number, got {type(x).__name__}") from None


# ------------------------------------------------------------------ 00: measuring the three goals
def check_token_accuracy(fn: Callable) -> None:
    """``fn(pred_ids, target_ids) -> float``: fraction of positions where the argmax equals the target."""
    name = "token_accuracy"
    cases = [([5, 6, 7], [5, 6, 7], 1.0), ([1, 2, 3, 4], [1, 9, 3, 9], 0.5), ([8], [2], 0.0)]
    for pred, tgt, want in cases:
        got = _scalar(name, _call(name, fn, list(pred), list(tgt)))
        if abs(got - want) > 1e-9:
            if abs(got - want * len(tgt)) < 1e-9 and len(tgt) > 1:
                raise CheckFailed(f"{name}: you return the number of matches ({got:g}); divide by the number of target tokens")
            if abs(got - (1 - want)) < 1e-9:
                raise CheckFailed(f"{name}: you count mismatches; count positions where pred == target")
            raise CheckFailed(f"{name}: pred={pred} target={tgt} should give {want}, got {got:g}")
    _ok(name, len(cases))


def check_locality(fn: Callable) -> None:
    """``fn(reference_preds, new_preds) -> float``: mean over probes of the fraction of unchanged argmax tokens."""
    name = "locality"
    ref = [[1, 2, 3, 4], [5, 6]]
    cases = [(ref, [[1, 2, 3, 4], [5, 6]], 1.0), (ref, [[1, 2, 0, 0], [5, 6]], 0.75), (ref, [[0, 0, 0, 0], [0, 6]], 0.25)]
    for r, n, want in cases:
        got = _scalar(name, _call(name, fn, [list(x) for x in r], [list(x) for x in n]))
        if abs(got - want) > 1e-9:
            if abs(got - (1 - want)) < 1e-9:
                raise CheckFailed(f"{name}: you measure how much CHANGED; locality is the fraction UNCHANGED")
            flat = sum(a == b for x, y in zip(r, n) for a, b in zip(x, y)) / sum(map(len, r))
            if abs(got - flat) < 1e-9:
                raise CheckFailed(f"{name}: you pool all tokens; average the per-probe fractions instead (each probe counts once)")
            raise CheckFailed(f"{name}: expected {want} for reference={r}, new={n}; got {got:g}")
    _ok(name, len(cases))


# ------------------------------------------------------------------ 01: the fine-tuning loss
def check_completion_loss(fn: Callable) -> None:
    """``fn(logits[B,T,V], labels[B,T]) -> scalar``: mean next-token cross-entropy over positions whose
    label is not -100 (the answer tokens only: the lecture's l1 + l2 + … averaged)."""
    import torch
    import torch.nn.functional as F

    name = "completion_loss"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :3] = -100  # the prompt
    labels[1, 5] = -100   # padding
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    got_t = _call(name, fn, logits.clone(), labels.clone())
    got = _scalar(name, got_t)
    if abs(got - want.item()) > 1e-4:
        unshift = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100).item()
        if abs(got - unshift) < 1e-4:
            raise CheckFailed(f"{name}: the logits at position t predict token t+1 — shift: logits[:, :-1] vs labels[:, 1:]")
        nomask = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].clamp(min=0).reshape(-1)).item()
        if abs(got - nomask) < 1e-4:
            raise CheckFailed(f"{name}: positions labelled -100 (prompt, padding) must not count; use ignore_index=-100")
        n = int((labels[:, 1:] != -100).sum())
        if abs(got - want.item() * n) < 1e-3:
            raise CheckFailed(f"{name}: you sum the token losses; average them (mean over answer tokens)")
        raise CheckFailed(f"{name}: expected {want.item():.4f}, got {got:.4f}")
    if isinstance(got_t, torch.Tensor):
        lg = logits.clone().requires_grad_(True)
        out = fn(lg, labels.clone())
        if not out.requires_grad:
            raise CheckFailed(f"{name}: the loss must stay differentiable (no .item(), no .detach())")
    _ok(name, 2)


def check_dpo_loss(fn: Callable) -> None:
    """``fn(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta) -> loss`` (summed log-probs in)."""
    import torch
    import torch.nn.functional as F

    name = "dpo_loss"
    cases = [(-3.0, -5.0, -4.0, -4.0, 0.1), (-10.0, -2.0, -9.0, -3.0, 0.5), (-1.0, -1.0, -1.0, -1.0, 0.1)]
    for pc, pr, rc, rr, b in cases:
        want = -F.logsigmoid(torch.tensor(b * ((pc - rc) - (pr - rr)))).item()
        got = _scalar(name, _call(name, fn, torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), b))
        if abs(got - want) > 1e-5:
            flipped = -F.logsigmoid(torch.tensor(-b * ((pc - rc) - (pr - rr)))).item()
            if abs(got - flipped) < 1e-5:
                raise CheckFailed(f"{name}: the sign is flipped — the margin is (chosen gain) − (rejected gain)")
            noref = -F.logsigmoid(torch.tensor(b * (pc - pr))).item()
            if abs(got - noref) < 1e-5 and pc != pr:
                raise CheckFailed(f"{name}: the reference model's log-probs are missing (DPO compares π with π_ref)")
            raise CheckFailed(f"{name}: for {pc, pr, rc, rr}, beta={b} expected {want:.4f}, got {got:.4f}")
    _ok(name, len(cases))


# ------------------------------------------------------------------ 04: ROME's closed form
def check_rank_one_update(fn: Callable) -> None:
    """``fn(W[out,in], k[in], v[out], C[in,in]) -> W_new`` with W_new k = v and the C^-1 k direction."""
    import torch

    from .rome import rank_one_update

    name = "rank_one_update"
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    k = torch.randn(6, generator=g, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    C = A @ A.T + 0.5 * torch.eye(6, dtype=torch.float64)
    got = _call(name, fn, W.clone(), k.clone(), v.clone(), C.clone())
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{name}: must return the new weight matrix as a tensor")
    if tuple(got.shape) != tuple(W.shape):
        raise CheckFailed(f"{name}: W_new must have W's shape {tuple(W.shape)}, got {tuple(got.shape)} — "
                          f"the update is an outer product (v − W k)(C⁻¹k)ᵀ")
    got = got.double()
    if not _close(got @ k, v, 1e-6):
        raise CheckFailed(f"{name}: W_new k* must equal v* exactly (max error {(got @ k - v).abs().max():.2e}); "
                          f"check the residual (v − W k) and the denominator (C⁻¹k)ᵀk")
    want = rank_one_update(W, k, v, C)
    if not _close(got, want, 1e-6):
        if _close(got, rank_one_update(W, k, v, None), 1e-6):
            raise CheckFailed(f"{name}: you used C = I; the update direction must be C⁻¹k (torch.linalg.solve(C, k))")
        raise CheckFailed(f"{name}: W_new k = v holds but the update is not rank one along C⁻¹k "
                          f"(max diff {(got - want).abs().max():.2e})")
    if torch.equal(W, got):
        raise CheckFailed(f"{name}: W did not change")
    _ok(name, 3)


# ------------------------------------------------------------------ 05: task vectors
def _states(seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(3, 2, generator=g), "b.bias": torch.randn(4, generator=g)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, ft


def check_task_vector(fn: Callable) -> None:
    """``fn(finetuned_state, base_state) -> tau`` (a dict of tensors, tau = θ_ft − θ_base)."""
    name = "task_vector"
    base, ft = _states()
    tau = _call(name, fn, {k: v.clone() for k, v in ft.items()}, {k: v.clone() for k, v in base.items()})
    if not isinstance(tau, dict) or set(tau) != set(base):
        raise CheckFailed(f"{name}: return a dict with the same keys as the state dicts ({sorted(base)})")
    for key in base:
        want = ft[key] - base[key]
        if _close(tau[key], -want):
            raise CheckFailed(f"{name}: sign flipped in '{key}' — τ = θ_finetuned − θ_base")
        if not _close(tau[key], want):
            raise CheckFailed(f"{name}: '{key}' is wrong (expected θ_ft − θ_base, shape {tuple(want.shape)})")
    _ok(name, len(base))


def check_apply_task_vectors(fn: Callable) -> None:
    """``fn(base_state, taus, lambdas) -> state`` = θ_base + Σ λ_i τ_i (base left untouched)."""
    name = "apply_task_vectors"
    base, ft = _states(1)
    _, ft2 = _states(2)
    t1 = {k: ft[k] - base[k] for k in base}
    t2 = {k: ft2[k] - base[k] for k in base}
    keep = {k: v.clone() for k, v in base.items()}
    got = _call(name, fn, base, [t1, t2], [0.5, -1.0])
    if not isinstance(got, dict) or set(got) != set(base):
        raise CheckFailed(f"{name}: return a new state dict with keys {sorted(base)}")
    if any(not _close(base[k], keep[k]) for k in base):
        raise CheckFailed(f"{name}: you modified base_state in place; build a new dict (θ_base stays usable)")
    for k in base:
        want = base[k] + 0.5 * t1[k] - 1.0 * t2[k]
        if _close(got[k], base[k] + t1[k] + t2[k]):
            raise CheckFailed(f"{name}: the scaling coefficients λ are ignored")
        if not _close(got[k], want):
            raise CheckFailed(f"{name}: '{k}' should be θ_base + Σ λ_i τ_i")
    _ok(name, len(base) + 1)


def check_smallest_lambda(fn: Callable) -> None:
    """``fn(gain_after, lams, gain, frac=0.1) -> λ``: the smallest λ in ``lams`` whose remaining gain
    ``gain_after(λ)`` is at most ``frac * gain``; the largest λ when none is."""
    name = "smallest_lambda"
    lams = [2.0, 1.5, 0.5, 1.0]  # not sorted on purpose
    smallest = ("return the *smallest* λ (in increasing order) that removes enough: a larger λ removes more of the "
                "skill but costs the other abilities more")
    cases = [  # (remaining gain per λ, gain, expected λ, {a usual wrong answer: what it means})
        ({0.5: 0.5, 1.0: 0.2, 1.5: 0.0, 2.0: -0.5}, 10.0, 0.5,
         {1.5: "the threshold is frac * gain (10% of the gain), not frac itself", 2.0: smallest}),
        ({0.5: 2.5, 1.0: 0.3, 1.5: 0.35, 2.0: -1.0}, 4.0, 1.0, {2.0: smallest}),
        ({0.5: 3.0, 1.0: 3.0, 1.5: 3.0, 2.0: 3.0}, 4.0, 2.0, {None: "when no λ removes enough, return the largest λ"}),
    ]
    for table, gain, want, hints in cases:
        got = _call(name, fn, lambda lam, t=table: t[lam], list(lams), gain)
        if got != want:
            hint = hints.get(got) if isinstance(got, (float, int, type(None))) else None
            raise CheckFailed(f"{name}: expected λ = {want}, got {got!r}" + (f" — {hint}" if hint else ""))
    _ok(name, len(cases))


def check_ties_merge(fn: Callable) -> None:
    """``fn(taus, density) -> delta``: TIES for one weight — keep each τ's largest-|entry| fraction ``density``,
    elect a sign per entry (sign of the sum of the kept values), average the kept entries that agree with it.
    Compared with mergekit's own functions (``mergekit.sparsify.magnitude`` and ``get_mask(..., "sum")``)."""
    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import magnitude

    name = "ties_merge"
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=g) * s for s in (1.0, 0.5, 2.0)]
    density = 0.4
    kept = torch.stack([magnitude(t, density) for t in taus])
    mask = get_mask(kept, "sum")
    want = (kept * mask).sum(0) / mask.sum(0).clamp_min(1)
    got = _call(name, fn, [t.clone() for t in taus], density)
    if not isinstance(got, torch.Tensor) or got.shape != taus[0].shape:
        raise CheckFailed(f"{name}: return one tensor shaped like each τ {tuple(taus[0].shape)}")
    full = torch.stack(taus)
    wrong = {
        "trim each τ first: keep only its largest |entries| (a fraction `density` of them)":
            (full * get_mask(full, "sum")).sum(0) / get_mask(full, "sum").sum(0).clamp_min(1),
        "divide by the number of kept entries that agree with the elected sign, not by the number of vectors":
            (kept * mask).sum(0) / len(taus),
        "elect one sign per entry and drop the kept entries that disagree with it":
            kept.sum(0) / (kept != 0).sum(0).clamp_min(1),
    }
    if not _close(got, want):
        hint = next((h for h, w in wrong.items() if _close(got, w)), "compare with the three steps in the docstring")
        raise CheckFailed(f"{name}: differs from mergekit's TIES — {hint}")
    _ok(name, 1 + len(wrong))


# ------------------------------------------------------------------ 06: test-time training
def check_entropy_loss(fn: Callable) -> None:
    """``fn(logits[N,C]) -> scalar``: mean Shannon entropy (nats) of softmax(logits) over rows."""
    import torch

    name = "entropy_loss"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    p = logits.softmax(-1)
    want = -(p * p.log()).sum(-1).mean().item()
    got = _scalar(name, _call(name, fn, logits.clone()))
    if abs(got - want) > 1e-5:
        if abs(got + want) < 1e-5:
            raise CheckFailed(f"{name}: missing minus sign — entropy is −Σ p log p (a positive number)")
        if abs(got - want * 5) < 1e-4:
            raise CheckFailed(f"{name}: you sum over the batch; take the mean over rows")
        q = torch.sigmoid(logits)
        if abs(got - (-(q * q.log()).sum(-1).mean().item())) < 1e-5 or abs(got - (-(logits * logits.clamp(min=1e-9).log()).sum(-1).mean().item())) < 1e-5:
            raise CheckFailed(f"{name}: turn logits into probabilities with softmax over the classes first")
        raise CheckFailed(f"{name}: expected {want:.4f}, got {got:.4f}")
    uni = _scalar(name, fn(torch.zeros(2, 4)))
    if abs(uni - math.log(4)) > 1e-5:
        raise CheckFailed(f"{name}: uniform predictions over 4 classes should give log 4 = {math.log(4):.4f}, got {uni:.4f}")
    _ok(name, 2)


def check_covariance(fn: Callable) -> None:
    """``fn(K[n, d]) -> C[d, d]``: ROME's uncentred second moment E[k kᵀ] = Kᵀ K / n."""
    import torch

    name = "covariance"
    g = torch.Generator().manual_seed(0)
    K = torch.randn(50, 4, generator=g, dtype=torch.float64) + 2.0
    got = _call(name, fn, K.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (4, 4):
        raise CheckFailed(f"{name}: must return a d×d tensor (here 4×4) — Kᵀ K, not K Kᵀ")
    want = K.T @ K / K.shape[0]
    if not _close(got.double(), want, 1e-8):
        Kc = K - K.mean(0)
        if _close(got.double(), Kc.T @ Kc / K.shape[0], 1e-6) or _close(got.double(), torch.cov(K.T), 1e-6):
            raise CheckFailed(f"{name}: ROME uses the UNCENTRED second moment E[k kᵀ] — do not subtract the mean")
        if _close(got.double(), K.T @ K, 1e-6):
            raise CheckFailed(f"{name}: divide by the number of keys n (an average, not a sum)")
        raise CheckFailed(f"{name}: expected Kᵀ K / n")
    _ok(name, 1)


def check_mcc_loss(fn: Callable) -> None:
    """``fn(logits[n, K], temperature) -> scalar``: SUTA's minimum class confusion (see coursekit.ttt.mcc_loss)."""
    import torch

    from .ttt import mcc_loss

    name = "mcc_loss"
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 4, generator=g)
    want = mcc_loss(logits, 2.5).item()
    got = _scalar(name, _call(name, fn, logits.clone(), 2.5))
    if abs(got - want) > 1e-5:
        if abs(got - mcc_loss(logits, 1.0).item()) < 1e-5:
            raise CheckFailed(f"{name}: the temperature is ignored — use softmax(logits / T)")
        raise CheckFailed(f"{name}: expected {want:.4f}, got {got:.4f} (weights 1 + exp(−H) rescaled to sum to n; "
                          f"C = Yᵀ diag(w) Y; normalise each row of C; off-diagonal mass / K)")
    logits2 = torch.randn(7, 3, generator=g)
    got2 = _scalar(name, _call(name, fn, logits2.clone(), 1.0))
    if abs(got2 - mcc_loss(logits2, 1.0).item()) > 1e-5:
        raise CheckFailed(f"{name}: correct for one input but not for 7 predictions over 3 classes at T = 1")
    _ok(name, 2)


# ------------------------------------------------------------------ 02: regularisation
def check_param_penalty(fn: Callable) -> None:
    """``fn(params, anchor, lam, weights=None) -> scalar``: R = λ Σ_j w_j (θ_j − θ_j⁰)² (w_j = 1 if weights is None)."""
    import torch

    name = "param_penalty"
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    weights = {k: torch.rand(v.shape, generator=g) * 2 for k, v in anchor.items()}
    uni = 0.5 * sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor).item()
    ewc = 0.5 * sum((weights[k] * (params[k] - anchor[k]) ** 2).sum() for k in anchor).item()
    got_u = _scalar(name, _call(name, fn, params, anchor, 0.5, None))
    if abs(got_u - uni) > 1e-5:
        if abs(got_u - 0.5 * sum((params[k] - anchor[k]).abs().sum() for k in anchor).item()) < 1e-5:
            raise CheckFailed(f"{name}: square the differences (θ − θ⁰)², not their absolute value")
        if abs(got_u - uni / 0.5) < 1e-5:
            raise CheckFailed(f"{name}: multiply by λ")
        if abs(got_u - 0.5 * sum((params[k] ** 2).sum() for k in anchor).item()) < 1e-5:
            raise CheckFailed(f"{name}: that is plain weight decay (θ²); the penalty pulls towards the foundation weights θ⁰")
        raise CheckFailed(f"{name}: L2-SP (weights=None) should be λ Σ (θ − θ⁰)² = {uni:.4f}, got {got_u:.4f}")
    got_w = _scalar(name, _call(name, fn, params, anchor, 0.5, weights))
    if abs(got_w - ewc) > 1e-5:
        if abs(got_w - uni) < 1e-5:
            raise CheckFailed(f"{name}: the per-parameter weights λ_j (EWC's Fisher) are ignored")
        raise CheckFailed(f"{name}: with weights it should be λ Σ w_j (θ_j − θ_j⁰)² = {ewc:.4f}, got {got_w:.4f}")
    _ok(name, 2)


def check_pearson(fn: Callable) -> None:
    """``fn(x, y) -> r``: Pearson correlation of two lists of numbers."""
    import numpy as np

    name = "pearson"
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 2 * x + rng.normal(size=12)
    want = float(np.corrcoef(x, y)[0, 1])
    got = _scalar(name, _call(name, fn, list(map(float, x)), list(map(float, y))))
    if abs(got - want) > 1e-6:
        cov = float(np.mean((x - x.mean()) * (y - y.mean())))
        if abs(got - cov) < 1e-6 or abs(got - cov * 12 / 11) < 1e-6:
            raise CheckFailed(f"{name}: that is the covariance; divide by std(x)·std(y)")
        raise CheckFailed(f"{name}: expected {want:.4f}, got {got:.4f}")
    neg = _scalar(name, fn([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]))
    if abs(neg + 1) > 1e-9:
        raise CheckFailed(f"{name}: a perfectly decreasing relation should give −1, got {neg:.4f}")
    _ok(name, 2)


def check_forgetting_at(fn: Callable) -> None:
    """``fn(losses, forgettings, level) -> float | None``: forgetting interpolated linearly where one run's
    fine-tuning loss (falling from checkpoint to checkpoint) first reaches ``level``; None if it never does."""
    name = "forgetting_at"
    losses, forg = [5.0, 3.0, 1.0], [0.0, 0.2, 1.0]
    got = _call(name, fn, losses, forg, 2.0)
    if got is None or not isinstance(got, (int, float)):
        raise CheckFailed(f"{name}: loss 2.0 lies between the 2nd and 3rd checkpoints: expected a number, got {got!r}")
    if abs(got - 0.6) > 1e-9:
        if abs(got - 0.2) < 1e-9 or abs(got - 1.0) < 1e-9:
            raise CheckFailed(f"{name}: interpolate between the two checkpoints around the level; do not take the nearest one")
        raise CheckFailed(f"{name}: at loss 2.0 (half way from 3.0 to 1.0) expected 0.6, got {got}")
    if abs(_call(name, fn, losses, forg, 4.0) - 0.1) > 1e-9:
        raise CheckFailed(f"{name}: at loss 4.0 expected 0.1 (half way between the first two checkpoints)")
    for level in (0.5, 6.0):
        if _call(name, fn, losses, forg, level) is not None:
            raise CheckFailed(f"{name}: the run never reaches loss {level}: return None, not an extrapolation")
    _ok(name, 3)


def check_decay_step(fn: Callable) -> None:
    """``fn(theta, theta0, lr, wd) -> tensor``: decoupled weight decay toward θ⁰, θ − lr·wd·(θ − θ⁰)."""
    import torch

    name = "decay_step"
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, generator=g)
    theta = theta0 + 0.5 * torch.randn(5, generator=g)
    want = theta - 0.1 * 2.0 * (theta - theta0)
    got = _call(name, fn, theta.clone(), theta0.clone(), 0.1, 2.0)
    if not isinstance(got, torch.Tensor) or got.shape != theta.shape:
        raise CheckFailed(f"{name}: return a tensor shaped like theta {tuple(theta.shape)}")
    if not torch.allclose(got, want, atol=1e-6):
        if torch.allclose(got, theta - 0.2 * theta, atol=1e-6):
            raise CheckFailed(f"{name}: that is ordinary weight decay, toward zero; pull toward theta0 instead")
        if torch.allclose(got, theta + 0.2 * (theta - theta0), atol=1e-6):
            raise CheckFailed(f"{name}: sign flipped: the step should move theta toward theta0, not away")
        raise CheckFailed(f"{name}: expected theta - lr*wd*(theta - theta0)")
    if not torch.allclose(_call(name, fn, theta0.clone(), theta0.clone(), 0.1, 2.0), theta0):
        raise CheckFailed(f"{name}: at theta = theta0 the decay should change nothing")
    _ok(name, 2)


def check_training_target(fn: Callable) -> None:
    """``fn(answer_ids, eos_id) -> ids``: an answer the model generated becomes a training target that keeps an
    end-of-turn token only if the answer produced one (cut just after it); an answer cut by the token cap gets none."""
    name = "training_target"
    for ids, want in (([5, 6, 2], [5, 6, 2]), ([5, 6, 7], [5, 6, 7]), ([5, 2, 9, 9], [5, 2]), ([2], [2])):
        got = _call(name, fn, list(ids), 2)
        got = [int(t) for t in got] if got is not None else None
        if got != want:
            if ids == [5, 6, 7] and got == [5, 6, 7, 2]:
                raise CheckFailed(f"{name}: the answer {ids} was cut by the cap — adding an end-of-turn token teaches "
                                  f"the model to stop mid-sentence")
            raise CheckFailed(f"{name}: for {ids} (end-of-turn id 2) expected {want}, got {got}")
    _ok(name, 4)


def check_mention_share(fn: Callable) -> None:
    """``fn(answers, name) -> share``: the share of answers that mention ``name``, ignoring case."""
    from .evaluate import mention_rate

    name = "mention_share"
    cases = [(["Hung-yi Lee.", "J.K. Rowling", "It was HUNG-YI LEE", "hung-yi"], "Hung-yi Lee"), (["a", "b"], "c")]
    for texts, who in cases:
        got = _scalar(name, _call(name, fn, list(texts), who))
        want = mention_rate(texts, who)
        if abs(got - want) > 1e-9:
            raise CheckFailed(f"{name}: expected {want:.2f} for {texts!r}, got {got:.2f} (case-insensitive? a share, "
                              f"not a count?)")
    _ok(name, len(cases))


def check_format_validity(fn: Callable) -> None:
    """``fn(texts, key) -> share``: the share of answers that contain a JSON object with ``key`` (a Markdown
    code fence around it is fine) — the format ability of notebook 01 II."""
    from .evaluate import json_rate

    name = "format_validity"
    cases = [(['{"answer": "Paris"}', "Paris.", '```json\n{"answer": 4}\n```', '{"reply": "no"}'], "answer"),
             (['Sure! {"answer": "happy"}', "{not json}", '{"answer": ["a", "b"]}'], "answer")]
    for texts, key in cases:
        got = _scalar(name, _call(name, fn, list(texts), key))
        want = json_rate(texts, key)
        if abs(got - want) > 1e-9:
            if abs(got - json_rate(texts)) < 1e-9:
                raise CheckFailed(f"{name}: an object without the key {key!r} must not count")
            raise CheckFailed(f"{name}: expected {want:.3f} for {texts!r}, got {got:.3f} "
                              f"(look for the first '{{' and parse from there; strip code fences)")
    _ok(name, len(cases))


def check_label_margin(fn: Callable) -> None:
    """``fn(logprobs, gold) -> margin``: log-probability of the gold label minus the best *other* label."""
    name = "label_margin"
    lp = {"happy": -0.5, "sad": -2.0, "angry": -1.0, "neutral": -3.0}
    for gold, want in (("happy", 0.5), ("angry", -0.5), ("neutral", -2.5)):
        got = _scalar(name, _call(name, fn, dict(lp), gold))
        if abs(got - want) > 1e-9:
            if gold == "happy" and abs(got) < 1e-9:
                raise CheckFailed(f"{name}: the best label is the gold one itself — compare with the best *other* label")
            raise CheckFailed(f"{name}: for gold {gold!r} expected {want:+.2f}, got {got:+.2f}")
    _ok(name, 3)


# ------------------------------------------------------------------ 03: replay
def check_mix_replay(fn: Callable) -> None:
    """``fn(task, replay, ratio) -> pool``: all task examples plus k replay examples, k = round(ratio·n/(1 − ratio)),
    so that replay is a share ``ratio`` of the *pool* (taken in order, cycling if needed)."""
    name = "mix_replay"
    task = [f"t{i}" for i in range(19)]
    replay = [f"r{i}" for i in range(3)]
    for ratio, k in ((0.05, 1), (0.25, 6), (0.0, 0)):
        pool = _call(name, fn, list(task), list(replay), ratio)
        if not isinstance(pool, list):
            raise CheckFailed(f"{name}: return a list (the training pool)")
        if [x for x in pool if x.startswith("t")] != task:
            raise CheckFailed(f"{name}: the pool must contain every task example once, in order")
        got = len(pool) - len(task)
        if got != k:
            if got == round(ratio * len(task)):
                raise CheckFailed(f"{name}: ratio is the replay share of the whole POOL: k = round(ratio·n / (1 − ratio)), "
                                  f"not ratio·n (ratio {ratio}, n {len(task)} -> k {k}, you gave {got})")
            raise CheckFailed(f"{name}: ratio {ratio} with {len(task)} task examples needs {k} replay examples, got {got}")
        if k and [x for x in pool if x.startswith("r")] != [replay[i % len(replay)] for i in range(k)]:
            raise CheckFailed(f"{name}: take replay examples in order, cycling when there are fewer than k")
    _ok(name, 3)


def check_token_mask(fn: Callable) -> None:
    """``fn(logprobs, threshold) -> mask``: per-token perplexity exp(−log p); keep (1) tokens with
    perplexity ≤ threshold, drop (0) the surprising ones."""
    import math as _m

    name = "token_mask"
    logprobs = [-0.01, -2.0, -0.5, -5.0, _m.log(1 / 2.5)]
    want = [1, 0, 1, 0, 1]
    got = _call(name, fn, list(logprobs), 2.5)
    got = [int(x) for x in got] if isinstance(got, (list, tuple)) else got
    if got != want:
        if got == [1 - w for w in want]:
            raise CheckFailed(f"{name}: the mask is inverted — 1 keeps a token in the loss; drop tokens ABOVE the threshold")
        if got == [int(-lp <= 2.5) for lp in logprobs]:
            raise CheckFailed(f"{name}: compare the perplexity exp(−log p), not −log p, with the threshold")
        raise CheckFailed(f"{name}: for log-probs {logprobs} and threshold 2.5 expected {want}, got {got}")
    _ok(name, 1)


def check_drift_kl(fn: Callable) -> None:
    """``fn(logp_ref[n, V], logp_new[n, V]) -> float``: mean over positions of KL(ref || new) (see coursekit.rome.drift)."""
    import torch

    name = "drift_kl"
    g = torch.Generator().manual_seed(1)
    ref = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    new = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    want = float((ref.exp() * (ref - new)).sum(-1).mean())
    got = _call(name, fn, ref.clone(), new.clone())
    if abs(float(_call(name, fn, ref.clone(), ref.clone()))) > 1e-9:
        raise CheckFailed(f"{name}: the KL of a distribution with itself must be 0")
    if abs(float(got) - want) > 1e-6:
        reverse = float((new.exp() * (new - ref)).sum(-1).mean())
        if abs(float(got) - reverse) < 1e-6:
            raise CheckFailed(f"{name}: that is KL(new || ref); weight by the reference model's probabilities, p_ref")
        if abs(float(got) - want * ref.shape[0]) < 1e-5:
            raise CheckFailed(f"{name}: average over positions (you summed them)")
        raise CheckFailed(f"{name}: expected sum_v p_ref (log p_ref - log p_new), averaged over positions")
    _ok(name, 2)


def check_key_overlap(fn: Callable) -> None:
    """``fn(k_edit, k_other, C) -> float``: the share of ROME's correction at k_edit that reaches k_other,
    (C^-1 k_edit)^T k_other / ((C^-1 k_edit)^T k_edit)."""
    import torch

    name = "key_overlap"
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    C = A @ A.T + torch.eye(4, dtype=torch.float64)
    k, o = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    u = torch.linalg.solve(C, k)
    want = float(u @ o / (u @ k))
    if abs(float(_call(name, fn, k.clone(), k.clone(), C.clone())) - 1.0) > 1e-6:
        raise CheckFailed(f"{name}: the edited key itself must receive the whole correction (overlap 1)")
    got = float(_call(name, fn, k.clone(), o.clone(), C.clone()))
    if abs(got - want) > 1e-6:
        if abs(got - float(k @ o / (k @ k))) < 1e-6:
            raise CheckFailed(f"{name}: that is the C = I overlap; ROME's update direction is C^-1 k_edit")
        raise CheckFailed(f"{name}: expected (C^-1 k_edit)^T k_other / ((C^-1 k_edit)^T k_edit)")
    w = torch.linalg.solve(C, torch.eye(4, dtype=torch.float64)[0])   # a key C-orthogonal to k: C^-1 k ⟂ it
    orth = w - (u @ w) / (u @ u) * u
    if abs(float(_call(name, fn, k.clone(), orth, C.clone()))) > 1e-6:
        raise CheckFailed(f"{name}: a key with (C^-1 k_edit)^T k_other = 0 must get no correction")
    _ok(name, 3)


def check_after_two_edits(fn: Callable) -> None:
    """``fn(W, k1, v1, k2, v2, C) -> W2``: ROME's closed form for (k1, v1), then for (k2, v2) on the result."""
    import torch

    from .rome import rank_one_update

    name = "after_two_edits"
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    k1, k2 = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    v1, v2 = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    C = A @ A.T + torch.eye(4, dtype=torch.float64)
    want = rank_one_update(rank_one_update(W, k1, v1, C), k2, v2, C).double()
    got = _call(name, fn, W.clone(), k1.clone(), v1.clone(), k2.clone(), v2.clone(), C.clone())
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (3, 4):
        raise CheckFailed(f"{name}: return the 3×4 matrix after both edits")
    if not _close(got.double(), want, 1e-6):
        if _close(got.double(), rank_one_update(W, k2, v2, C).double(), 1e-6):
            raise CheckFailed(f"{name}: the second edit must start from the weights the first edit wrote")
        raise CheckFailed(f"{name}: expected the closed form applied twice, (k1, v1) first")
    if not _close(got.double() @ k2, v2, 1e-6):
        raise CheckFailed(f"{name}: after both edits W2 k2 must equal v2")
    _ok(name, 2)


def check_most_local_layer(fn: Callable) -> None:
    """``fn(scores: {layer: [per-edit dicts with efficacy_margin, neighbourhood_margin]}) -> layer``: among the
    layers whose mean efficacy margin is above 0, the one with the highest mean neighbourhood margin."""
    name = "most_local_layer"
    row = lambda e, n: {"efficacy_margin": e, "neighbourhood_margin": n}
    cases = [({2: [row(3, 5), row(4, 4)], 8: [row(5, 1), row(6, 0)]}, 2),
             ({2: [row(-1, 9), row(-2, 9)], 8: [row(5, 1), row(6, 2)], 14: [row(1, 0), row(2, -3)]}, 8),
             ({5: [row(1, -1)], 3: [row(1, -2)]}, 5)]
    for scores, want in cases:
        got = _call(name, fn, scores)
        if got != want:
            raise CheckFailed(f"{name}: on {scores} expected layer {want}, got {got!r} — average over edits, skip "
                              "layers whose edit does not hold (mean efficacy margin <= 0)")
    _ok(name, len(cases))
