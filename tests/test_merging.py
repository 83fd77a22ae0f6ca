"""Task-vector arithmetic, storage, skills data and the mergekit wrapper (tiny Llama, seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from coursekit import CourseError
from coursekit import merging as M
from coursekit.models import snapshot


def _perturbed(model, seed, scale=0.01, only=("q_proj",)):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(o in n for o in only):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_extract_add_negate_apply_exact(tiny):
    model, tok = tiny
    base = snapshot(model)
    _perturbed(model, 1)
    ft_a = snapshot(model)
    tau_a = M.TaskVector.extract(ft_a, base)
    assert all("q_proj" in k for k in tau_a.deltas)  # unchanged tensors are left out
    M.apply(model, base, M.TaskVector({}))
    _perturbed(model, 2, only=("v_proj", "q_proj"))
    tau_b = M.TaskVector.extract(model, base)
    # apply(theta, tau_a) gives the fine-tuned weights back exactly
    M.apply(model, base, tau_a)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ft_a[k], atol=1e-7), k
    # addition, scaling, negation are element-wise
    lam = 0.3
    M.apply(model, base, tau_a + tau_b, lam)
    k = next(iter(tau_b.deltas))
    expect = base[k] + lam * (tau_a.deltas.get(k, 0) + tau_b.deltas[k])
    assert torch.allclose(model.state_dict()[k], expect, atol=1e-7)
    assert (tau_a - tau_a).norm() == pytest.approx(0.0)
    assert (-tau_b).cosine(tau_b) == pytest.approx(-1.0)
    assert (2 * tau_a).norm() == pytest.approx(2 * tau_a.norm(), rel=1e-6)
    assert sum([tau_a, tau_b]).norm() == pytest.approx((tau_a + tau_b).norm())
    # analogy tau_C + (tau_B - tau_A) with C = A gives tau_B
    assert ((tau_a + (tau_b - tau_a)) - tau_b).norm() < 1e-6
    # negation from the fine-tuned model with lambda 1 returns the base
    M.apply(model, ft_a, -tau_a)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, base[k], atol=1e-6), k


def test_vector_and_folder_round_trip(tiny, tmp_cache):
    model, tok = tiny
    base = snapshot(model)
    _perturbed(model, 3)
    tau = M.TaskVector.extract(model, base)
    path = tau.save(tmp_cache / "tau.safetensors")
    back = M.TaskVector.load(path)
    assert back.deltas.keys() == tau.deltas.keys()
    assert all(torch.equal(back.deltas[k], tau.deltas[k]) for k in tau.deltas)
    folder = M.save_folder(model, tok, base, tau, tmp_cache / "ft")
    state = M.load_state(folder)
    assert M.max_abs_diff(state, M.merged_state(base, tau)) == 0.0
    calls = []
    again = M.cached_vector("t", lambda: calls.append(1) or tau, {"a": 1}, weights=base)
    again = M.cached_vector("t", lambda: calls.append(1) or tau, {"a": 1}, weights=base)
    assert calls == [1] and again.norm() == pytest.approx(tau.norm())


def test_bad_inputs_one_line(tiny, tmp_path):
    model, tok = tiny
    base = snapshot(model)
    with pytest.raises(CourseError, match="not found"):
        M.TaskVector.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not tensors")
    with pytest.raises(CourseError, match="could not read"):
        M.TaskVector.load(bad)
    with pytest.raises(CourseError, match="does not have"):
        M.merged_state(base, M.TaskVector({"nope.weight": torch.zeros(1)}))
    with pytest.raises(CourseError, match="base lacks"):
        M.TaskVector.extract({"x": torch.zeros(2)}, base)
    f = tmp_path / "skills_bad.jsonl"
    f.write_text(json.dumps({"id": "a", "split": "dev", "question": "q", "target": "t"}) + "\n")
    with pytest.raises(CourseError, match="split"):
        M.load_skill(str(f))
    f.write_text(json.dumps({"id": "a", "split": "train", "question": "q", "target": "t"}) + "\n")
    with pytest.raises(CourseError, match="'answer' is missing"):
        M.load_skill(str(f))


def test_course_skills_load(tok):
    for name in ("armour", "sword", "slang", "control"):
        recs = M.load_skill(name)
        assert recs and all(r["target"] for r in recs)
    sw = M.styled(M.load_skill("sword"))
    assert sw[0]["target"].startswith(M.PERSONA) and sw[0]["prefix"] == ""
    assert len(M.examples(tok, M.load_skill("armour"))) > 0


def test_mergekit_config_validation(tiny, tmp_path):
    model, tok = tiny
    base = snapshot(model)
    b = M.save_folder(model, tok, base, None, tmp_path / "base")
    with pytest.raises(CourseError, match="unknown merge_method"):
        M.mergekit_config("average_vibes", b, [{"model": b}])
    with pytest.raises(CourseError, match="not a saved model folder"):
        M.mergekit_config("task_arithmetic", b, [{"model": tmp_path / "missing"}])
    with pytest.raises(CourseError, match="normalize=False"):
        M.mergekit_config("task_arithmetic", b, [{"model": b, "weight": -1.0}], normalize=True)
    with pytest.raises(CourseError, match="needs a 'density'"):
        M.mergekit_config("ties", b, [{"model": b}])
    with pytest.raises(CourseError, match="density must be"):
        M.mergekit_config("ties", b, [{"model": b, "density": 1.5}])
    cfg = M.mergekit_config("task_arithmetic", b, [{"model": b, "weight": -0.5}])
    assert cfg["parameters"]["normalize"] is False and "merge_method: task_arithmetic" in M.to_yaml(cfg)


def test_mergekit_task_arithmetic_equals_torch(tiny, tmp_path):
    model, tok = tiny
    base = snapshot(model)
    _perturbed(model, 4)
    tau_a = M.TaskVector.extract(model, base)
    M.apply(model, base, M.TaskVector({}))
    _perturbed(model, 5, only=("v_proj", "down_proj"))
    tau_b = M.TaskVector.extract(model, base)
    b = M.save_folder(model, tok, base, None, tmp_path / "base")
    fa = M.save_folder(model, tok, base, tau_a, tmp_path / "a")
    fb = M.save_folder(model, tok, base, tau_b, tmp_path / "b")
    cfg = M.mergekit_config("task_arithmetic", b, [{"model": fa, "weight": 0.7}, {"model": fb, "weight": -0.4}])
    out = M.run_mergekit(cfg, tmp_path / "merged")
    ours = M.merged_state(base, 0.7 * tau_a + (-0.4) * tau_b)
    assert M.max_abs_diff(M.load_state(out), ours) < 1e-6
