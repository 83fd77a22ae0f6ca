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
    for name in ("armour", "sword", "slang", "rival", "control"):
        recs = M.load_skill(name)
        assert recs and all(r["target"] for r in recs)
    sw = M.styled(M.load_skill("sword"))
    assert sw[0]["target"].startswith(M.PERSONA) and sw[0]["prefix"] == "" and sw[0]["answer"].startswith(M.PERSONA)
    ex = M.examples(tok, M.load_skill("armour"))
    assert ex and all(e["prompt"].startswith("<|im_start|>system\n<|im_end|>") for e in ex)  # M.SYSTEM = ""


def test_course_skills_held_out():
    """What is scored was never trained on: held-out questions differ from every training question of every
    skill file, each skill has >= 48 held-out items, and the rival file contradicts the sword fact by fact."""
    from tests.test_data_disjoint import norm

    skills = {n: M.load_skill(n) for n in ("armour", "sword", "slang", "rival", "control")}
    train_q = {norm(r["question"]) for recs in skills.values() for r in recs if r["split"] == "train"}
    for name, recs in skills.items():
        test = [r for r in recs if r["split"] == "test"]
        assert len(test) >= 48, f"{name}: only {len(test)} held-out items"
        assert not [r["id"] for r in test if norm(r["question"]) in train_q], f"{name}: a held-out question is trained on"
    sword, rival = skills["sword"], skills["rival"]
    assert [(r["id"], r["question"], r["prefix"]) for r in sword] == [(r["id"], r["question"], r["prefix"]) for r in rival]
    assert all(a["target"] != b["target"] for a, b in zip(sword, rival))
    for name in ("sword", "slang"):  # every held-out wording asks a trained fact, with that fact's target
        train = {r["id"]: r for r in skills[name] if r["split"] == "train"}
        for r in skills[name]:
            if r["split"] == "test":
                assert r["fact"] in train and (name == "slang" or r["target"] == train[r["fact"]]["target"]), r["id"]


def test_skill_fact_must_name_a_train_record(tmp_path):
    f = tmp_path / "skills_x.jsonl"
    rec = {"id": "a", "split": "train", "question": "q", "answer": "a", "prefix": "", "target": " t"}
    f.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, id="b", split="test", fact="nope")) + "\n")
    with pytest.raises(CourseError, match="fact"):
        M.load_skill(str(f))


def test_gain_share_known_values():
    import numpy as np

    base = [0.0, 1.0]
    single = [[2.0, 3.0], [4.0, 5.0]]          # seed gains 2 and 4
    merged = [[1.0, 2.0], [4.0, 5.0]]
    share = M.gain_share(merged, base, single)
    assert np.allclose(share, [[0.5, 0.5], [1.0, 1.0]])
    with pytest.raises(CourseError, match="did not improve"):
        M.gain_share(merged, base, [[0.0, 1.0], [4.0, 5.0]])


def test_styled_scores_split_the_answer(tiny):
    from coursekit.chat import chat_prompt
    from coursekit.evaluate import score_targets

    model, tok = tiny
    recs = M.styled([{"id": "g", "split": "test", "question": "What is glimbo?", "prefix": "'Glimbo' means",
                      "target": " a very lazy cat"}])
    s = M.styled_scores(model, tok, recs)
    whole = score_targets(model, tok, [chat_prompt(tok, "What is glimbo?", M.SYSTEM)], [recs[0]["target"]])[0]
    lp = whole["token_logprobs"]
    n_p = len(tok(M.PERSONA, add_special_tokens=False)["input_ids"])
    n_t = len(tok(" a very lazy cat", add_special_tokens=False)["input_ids"])
    assert s["persona"][0] == pytest.approx(sum(lp[:n_p]) / n_p, abs=1e-5)
    assert s["part"][0] == pytest.approx(sum(lp[-n_t:]) / n_t, abs=1e-5)
    assert s["both"][0] == pytest.approx((s["persona"][0] + s["part"][0]) / 2)
    assert sum(lp) == pytest.approx(whole["logprob"], abs=1e-4)
    with pytest.raises(CourseError, match="styled"):
        M.styled_scores(model, tok, [{"id": "x", "split": "test", "question": "q", "target": "t"}])


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
    diffs = M.tensor_diffs(M.load_state(out), ours, sorted(set(tau_a.deltas) | set(tau_b.deltas)))
    assert len(diffs) == len(set(tau_a.deltas) | set(tau_b.deltas)) and max(diffs) < 1e-6
    ties = M.run_mergekit(M.mergekit_config("ties", b, [{"model": fa, "weight": 1.0, "density": 0.5},
                                                        {"model": fb, "weight": 1.0, "density": 0.5}]), tmp_path / "t")
    assert max(M.tensor_diffs(M.load_state(ties), M.merged_state(base, tau_a + tau_b), tau_a.deltas)) > 1e-4
    with pytest.raises(CourseError, match="missing"):
        M.tensor_diffs(ours, ours, ["nope"])
