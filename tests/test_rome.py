"""Fast checks of coursekit.rome on the tiny random Llama (seconds)."""
from __future__ import annotations

import json

import pytest
import torch

import coursekit as ck
from coursekit import rome


def _req():
    return dict(subject="The Eiffel Tower", prompt="The Eiffel Tower is located in the city of", target_new=" Rome")


def test_rank_one_update_stores_key_value_exactly():
    torch.manual_seed(0)
    W, k, v = torch.randn(6, 10), torch.randn(10), torch.randn(6)
    A = torch.randn(10, 10)
    C = A @ A.T + 0.1 * torch.eye(10)
    W_new = rome.rank_one_update(W, k, v, C)
    assert torch.allclose(W_new @ k, v, atol=1e-4)
    assert torch.linalg.matrix_rank(W_new - W).item() == 1
    # keys that are C-orthogonal to k (u^T x = 0 with u = C^-1 k) are untouched
    u = torch.linalg.solve(C.double(), k.double()).float()
    x = torch.randn(10)
    x = x - (u @ x) / (u @ u) * u
    assert torch.allclose(W_new @ x, W @ x, atol=1e-4)


def test_identity_covariance_is_easyedit_form():
    torch.manual_seed(1)
    W, k, v = torch.randn(5, 8), torch.randn(8), torch.randn(5)
    expected = W + torch.outer(v - W @ k, k) / (k @ k)
    assert torch.allclose(rome.rank_one_update(W, k, v, None), expected, atol=1e-5)
    assert torch.allclose(rome.rank_one_update(W, k, v, torch.eye(8)), expected, atol=1e-5)


def test_rank_one_update_bad_shapes():
    with pytest.raises(ck.CourseError, match="rank_one_update"):
        rome.rank_one_update(torch.zeros(3, 4), torch.ones(5), torch.ones(3))
    with pytest.raises(ck.CourseError, match="C must be"):
        rome.rank_one_update(torch.zeros(3, 4), torch.ones(4), torch.ones(3), torch.eye(3))
    with pytest.raises(ck.CourseError, match="zero"):
        rome.rank_one_update(torch.zeros(3, 4), torch.zeros(4), torch.ones(3))


def test_subject_span(tok):
    p = "The Eiffel Tower is located in the city of"
    s0, s1 = rome.subject_span(tok, p, "Eiffel Tower")
    toks = [tok.decode([i]) for i in tok(p, add_special_tokens=False)["input_ids"]]
    assert "".join(toks[s0 : s1 + 1]).strip() == "Eiffel Tower"
    with pytest.raises(ck.CourseError, match="does not occur"):
        rome.subject_span(tok, p, "Space Needle")


def test_apply_rome_then_restore(tiny):
    model, tok = tiny
    snap = ck.models.snapshot(model)
    rec = rome.apply_rome(model, tok, _req(), layer=1, C=None, prefixes=["Hello there"], steps=3)
    W = model.model.layers[1].mlp.down_proj.weight
    assert rec.residual < 1e-4
    assert torch.allclose(W @ rec.k0, rec.v, atol=1e-4 * rec.v.norm().item())
    assert not torch.equal(W, snap["model.layers.1.mlp.down_proj.weight"])
    # only the edited matrix changed
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    ck.models.restore(model, snap)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    rome.apply_rome(model, tok, _req(), layer=1, kv=(rec.k, rec.v, rec.k0))
    rome.undo(model, rec)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, snap["model.layers.1.mlp.down_proj.weight"])


def test_compute_v_keeps_params_frozen_state(tiny):
    model, tok = tiny
    before = [p.requires_grad for p in model.parameters()]
    vr = rome.compute_v(model, tok, 0, _req()["prompt"], _req()["subject"], " Rome", steps=2)
    assert vr.v.shape == (model.config.hidden_size,)
    assert [p.requires_grad for p in model.parameters()] == before
    assert vr.delta_norm <= 4.0 * vr.v_init.norm().item() + 1e-5


def test_compute_v_runs_the_layers_below_once_with_the_same_result(tiny, monkeypatch):
    import contextlib

    model, tok = tiny
    layers = list(model.model.layers)
    args = (model, tok, 1, _req()["prompt"], _req()["subject"], " Rome", ["Hello there", "It was"])
    fast = rome.compute_v(*args, steps=4, stop_loss=0.0)
    assert list(model.model.layers) == layers  # the real layers are back
    calls = []
    layers[0].register_forward_hook(lambda *a: calls.append(1))
    rome.compute_v(*args, steps=4, stop_loss=0.0)
    assert len(calls) == 1  # one forward below the edit layer, not one per step
    monkeypatch.setattr(rome, "_layers_below_once", lambda m, l: contextlib.nullcontext(lambda: None))
    slow = rome.compute_v(*args, steps=4, stop_loss=0.0)
    assert fast.steps == slow.steps == 4
    assert torch.equal(fast.v, slow.v) and fast.history == slow.history


def test_bad_layer_and_request(tiny):
    model, tok = tiny
    with pytest.raises(ck.CourseError, match="layer"):
        rome.compute_k(model, tok, 7, _req()["prompt"], _req()["subject"])
    with pytest.raises(ck.CourseError, match="subject"):
        rome.apply_rome(model, tok, dict(_req(), subject=""), layer=0)


def test_trace_shapes(tiny):
    model, tok = tiny
    r = _req()
    tr = rome.trace_fact(model, tok, r["prompt"], r["subject"], " Paris", noise_samples=2, window=2)
    T = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
    for kind in ("hidden", "mlp", "attn"):
        assert tr.scores[kind].shape == (2, T)
        assert tr.indirect_effect(kind).shape == (2, T)
    # restoring the last layer's hidden state at the last token gives back the clean probability
    assert abs(tr.scores["hidden"][1, -1] - tr.p_clean) < 1e-5
    labels, avg = rome.align_traces([tr], "hidden")
    assert avg.shape == (2, 6) and len(labels) == 6
    with pytest.raises(ck.CourseError, match="trace kind"):
        rome.trace_fact(model, tok, r["prompt"], r["subject"], kinds=("mlpp",))


def test_layer_stats_cached(tiny, tmp_cache):
    model, tok = tiny
    Cs, n = rome.layer_stats(model, tok, [0, 1], ["hello world", "a b c d"])
    assert set(Cs) == {0, 1} and n > 0
    for C in Cs.values():
        assert C.shape == (64, 64) and torch.allclose(C, C.T, atol=1e-6)
    # one pass for several layers gives each layer's own statistic
    C1, n1 = rome.layer_stats(model, tok, [1], ["hello world", "a b c d"], cache=False)
    assert n1 == n and torch.allclose(C1[1], Cs[1], atol=1e-6)
    Cs2, n2 = rome.layer_stats(model, tok, [1, 0], ["hello world", "a b c d"])
    assert n2 == n and torch.allclose(Cs[0], Cs2[0])
    assert len(list((tmp_cache / "rome").glob("cov-*.safetensors"))) == 1


def test_trace_positions_only_restore_what_is_asked(tiny):
    model, tok = tiny
    r = _req()
    full = rome.trace_fact(model, tok, r["prompt"], r["subject"], " Paris", noise_samples=2, window=2)
    part = rome.trace_fact(model, tok, r["prompt"], r["subject"], " Paris", noise_samples=2, window=2,
                           positions=("subject_last", "last"), max_rows=3)
    s1, T = full.subject_range[1], len(full.tokens)
    for kind in ("hidden", "mlp", "attn"):
        got = part.scores[kind]
        assert torch.isnan(torch.tensor(got[:, 0])).all()          # not restored: NaN
        assert abs(got[:, [s1, T - 1]] - full.scores[kind][:, [s1, T - 1]]).max() < 1e-5   # batching changes nothing
    eff = rome.site_effects([part, part], "mlp", "subject_last")
    assert eff.shape == (2, 2) and abs(eff[0] - (part.scores["mlp"][:, s1] - part.p_corrupt)).max() < 1e-9
    with pytest.raises(ck.CourseError, match="trace position"):
        rome.trace_fact(model, tok, r["prompt"], r["subject"], positions=("middle",), noise_samples=1)


def test_edit_scores_and_finetune_baseline(tiny):
    model, tok = tiny
    snap = ck.models.snapshot(model)
    rec = dict(_req(), id="e", target_true=" Paris", paraphrases=["Tourists visit the Eiffel Tower in"],
               neighbourhood=[{"prompt": "The Louvre is located in the city of", "target": " Paris"}])
    s = rome.edit_scores(model, tok, rec)
    groups = ("efficacy", "paraphrase", "neighbourhood", "distracted", "paraphrase_start", "paraphrase_mid")
    assert set(s) == {f"{k}{m}" for k in groups for m in ("", "_margin")} | \
        {f"greedy_{k}" for k in ("efficacy", "paraphrase", "neighbourhood")}
    # the one paraphrase has the subject mid-sentence: it is the mid group, and the start group is empty (NaN)
    assert s["paraphrase_mid_margin"] == s["paraphrase_margin"] and s["paraphrase_start_margin"] != s["paraphrase_start_margin"]
    said = ck.chat.generate(model, tok, [rec["prompt"]], max_new_tokens=3)[0]
    assert s["greedy_efficacy"] == float(said.startswith("Rome"))
    assert rome.mean_scores([s, dict(s, paraphrase_start_margin=1.0)])["paraphrase_start_margin"] == 1.0   # NaN left out
    # before an edit: the efficacy margin and the neighbourhood margin are the same log-ratio with opposite sign conventions
    (lp_new, lp_true), _ = rome._mean_logprob(model, tok, [rec["prompt"]] * 2, [" Rome", " Paris"])
    assert abs(s["efficacy_margin"] - (lp_new - lp_true)) < 1e-5 and s["efficacy"] == float(lp_new > lp_true)
    assert rome.distracting_prompts(rec) == ["The Eiffel Tower is located in the city of Rome. The Louvre is located in the city of"]
    goal = s["efficacy_margin"] + 0.3
    out = rome.finetune_edit(model, tok, rec, "down_proj", layer=1, lr=1e-2, max_steps=40, until=goal)
    assert out["margin"] >= goal and 0 < out["steps"] < 40   # stopped as soon as the edit is firm enough
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    assert abs(rome.edit_scores(model, tok, rec)["efficacy_margin"] - out["margin"]) < 1e-4
    ck.models.restore(model, snap)
    with pytest.raises(ck.CourseError, match="params"):
        rome.finetune_edit(model, tok, rec, "mlp")


def test_drift_is_zero_unedited_and_positive_edited(tiny):
    model, tok = tiny
    snap = ck.models.snapshot(model)
    texts = ["the cat sat on the mat", "a b c d e f g"]
    ref = rome.next_token_logprobs(model, tok, texts)
    assert abs(rome.drift(model, tok, texts, ref)) < 1e-6
    rome.apply_rome(model, tok, _req(), layer=1, steps=3)
    assert rome.drift(model, tok, texts, ref) > 0
    ck.models.restore(model, snap)
    with pytest.raises(ck.CourseError, match="other texts"):
        rome.drift(model, tok, texts[:1], ref)


def test_sequential_edits_checkpoints(tiny):
    model, tok = tiny
    snap = ck.models.snapshot(model)
    recs = [dict(_req(), id=str(i), target_true=" Paris", target_new=t, paraphrases=["The Eiffel Tower stands in"],
                 neighbourhood=[{"prompt": "The Louvre is in", "target": " Paris"}]) for i, t in enumerate((" Rome", " Oslo"))]
    seq = rome.sequential_edits(model, tok, recs, 1, None, [], checkpoints=(2,), progress=False, steps=2)
    assert [s["n_edits"] for s in seq] == [2] and len(seq[0]["rows"]) == 2
    ck.models.restore(model, snap)


def test_sampled_texts_repeat_with_the_seed(tiny):
    model, tok = tiny
    a = rome.sample_texts(model, tok, ["The", "A b"], 4, seed=3)
    assert a == rome.sample_texts(model, tok, ["The", "A b"], 4, seed=3) and len(a) == 2


def test_counterfact_neighbours_share_the_object_and_are_never_edited():
    recs = rome.load_counterfact()
    assert all(n["target"] == r["target_true"] for r in recs for n in r["neighbourhood"])
    assert rome.edited_neighbours(recs) == []
    assert rome.edited_neighbours([dict(subject="Lyon", id="x", neighbourhood=[{"prompt": "Lyon is"}])]) == [("x", "Lyon is")]
    assert len({r["subject"] for r in recs}) == len(recs) >= 20
    # what an edit trains on (its prompt) is never what scores generality or locality
    prompts = {r["prompt"] for r in recs}
    assert not any(p in prompts for r in recs for p in r["paraphrases"])
    assert not any(n["prompt"] in prompts for r in recs for n in r["neighbourhood"])


def test_load_counterfact_real_file_and_errors(tmp_path):
    recs = rome.load_counterfact()
    assert len(recs) >= 20
    good = dict(id="a", subject="X", prompt="X is in", target_true=" A", target_new=" B", paraphrases=["X lies in"],
                neighbourhood=[{"prompt": "Y is in", "target": " A"}])
    p = tmp_path / "cf.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert rome.load_counterfact(p)[0]["id"] == "a"
    for bad, msg in [(dict(good, target_new=" A"), "must differ"), (dict(good, prompt="Z is in"), "contain the subject"),
                     (dict(good, paraphrases=[]), "paraphrases"), (dict(good, neighbourhood=[{"prompt": "Y"}]), "target"),
                     (dict(good, neighbourhood=[{"prompt": "Y is in", "target": " C"}]), "true object"),
                     (dict(good, neighbourhood=[{"prompt": "X is in", "target": " A"}]), "another subject")]:
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ck.CourseError, match=msg) as ei:
            rome.load_counterfact(p)
        assert "\n" not in str(ei.value)


def test_update_writes_the_value_at_the_bare_prompts_key():
    """The paper's code: u from the averaged key k*, the value written at k0 — W_new k0 = v exactly, and the
    eq.-2 form (k0 = k*) does not give it when the keys differ."""
    torch.manual_seed(2)
    W, k, v = torch.randn(6, 10).double(), torch.randn(10).double(), torch.randn(6).double()
    k0 = k + 0.8 * torch.randn(10).double()
    A = torch.randn(10, 10).double()
    C = A @ A.T + 0.1 * torch.eye(10).double()
    W_new = rome.rank_one_update(W, k, v, C, k0=k0)
    assert torch.allclose(W_new @ k0, v, atol=1e-8)
    assert not torch.allclose(rome.rank_one_update(W, k, v, C) @ k0, v, atol=1e-2)
    # the update's direction is still u = C^-1 k*: keys C-orthogonal to k* are untouched
    u = torch.linalg.solve(C, k)
    x = torch.randn(10).double()
    x = x - (u @ x) / (u @ u) * u
    assert torch.allclose(W_new @ x, W @ x, atol=1e-8)
    assert torch.equal(rome.rank_one_update(W, k, v, C, k0=k), rome.rank_one_update(W, k, v, C))
    with pytest.raises(ck.CourseError, match="k0 has"):
        rome.rank_one_update(W, k, v, C, k0=torch.ones(3))


def test_apply_rome_writes_v_at_k0_of_a_subject_that_starts_the_text(tiny):
    """A subject at the start of the text is tokenised differently in the bare prompt and in the prefixed
    contexts, so k0 != k*; the edited bare prompt must still get v* exactly."""
    model, tok = tiny
    snap = ck.models.snapshot(model)
    req, prefixes = _req(), ["Once upon a time", "In the news today"]
    keys = rome.context_keys(model, tok, 1, req["prompt"], req["subject"], prefixes)
    try:
        rec = rome.apply_rome(model, tok, req, layer=1, prefixes=prefixes, steps=2)
        assert torch.allclose(rec.k0, keys[0]) and torch.allclose(rec.k, keys.mean(0))
        assert not torch.allclose(rec.k0, rec.k, atol=1e-3)
        assert rec.residual < 1e-4 and rec.key_alignment != 1.0
        got = rome.context_keys(model, tok, 1, req["prompt"], req["subject"])[0]   # the edited layer's input: unchanged
        W = model.model.layers[1].mlp.down_proj.weight
        assert torch.allclose(W @ got, rec.v, atol=1e-4 * rec.v.norm().item())
    finally:
        ck.models.restore(model, snap)
