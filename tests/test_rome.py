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
    assert torch.allclose(W @ rec.k, rec.v, atol=1e-4 * rec.v.norm().item())
    assert not torch.equal(W, snap["model.layers.1.mlp.down_proj.weight"])
    # only the edited matrix changed
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    ck.models.restore(model, snap)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    rome.apply_rome(model, tok, _req(), layer=1, kv=(rec.k, rec.v))
    rome.undo(model, rec)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, snap["model.layers.1.mlp.down_proj.weight"])


def test_compute_v_keeps_params_frozen_state(tiny):
    model, tok = tiny
    before = [p.requires_grad for p in model.parameters()]
    vr = rome.compute_v(model, tok, 0, _req()["prompt"], _req()["subject"], " Rome", steps=2)
    assert vr.v.shape == (model.config.hidden_size,)
    assert [p.requires_grad for p in model.parameters()] == before
    assert vr.delta_norm <= 4.0 * vr.v_init.norm().item() + 1e-5


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
    C, n = rome.layer_stats(model, tok, 0, ["hello world", "a b c d"])
    assert C.shape == (64, 64) and n > 0
    assert torch.allclose(C, C.T, atol=1e-6)
    C2, n2 = rome.layer_stats(model, tok, 0, ["hello world", "a b c d"])
    assert n2 == n and torch.allclose(C, C2)
    assert len(list((tmp_cache / "rome").glob("cov-*.safetensors"))) == 1


def test_load_counterfact_real_file_and_errors(tmp_path):
    recs = rome.load_counterfact()
    assert len(recs) >= 20
    good = dict(id="a", subject="X", prompt="X is in", target_true=" A", target_new=" B", paraphrases=["X lies in"],
                neighbourhood=[{"prompt": "Y is in", "target": " C"}])
    p = tmp_path / "cf.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert rome.load_counterfact(p)[0]["id"] == "a"
    for bad, msg in [(dict(good, target_new=" A"), "must differ"), (dict(good, prompt="Z is in"), "contain the subject"),
                     (dict(good, paraphrases=[]), "paraphrases"), (dict(good, neighbourhood=[{"prompt": "Y"}]), "target")]:
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ck.CourseError, match=msg) as ei:
            rome.load_counterfact(p)
        assert "\n" not in str(ei.value)
