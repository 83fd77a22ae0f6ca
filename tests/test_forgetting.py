"""Fast tests for coursekit.forgetting: the hand-written DPO loss, token losses, data builders,
and the one-line errors for bad data."""
from __future__ import annotations

import json
import math

import pytest

from coursekit import CourseError
import coursekit as ck
from coursekit import forgetting as fg
from coursekit.data import data_path


def test_dpo_loss_known_values():
    import torch

    # identical policy and reference -> margin 0 -> log 2
    assert fg.dpo_loss(-3.0, -5.0, -3.0, -5.0).item() == pytest.approx(math.log(2))
    # margin = (−1 − −3) − (−6 − −4) = 4; beta 0.5 -> −log σ(2)
    want = -math.log(1 / (1 + math.exp(-2.0)))
    assert fg.dpo_loss(-1.0, -6.0, -3.0, -4.0, beta=0.5).item() == pytest.approx(want, rel=1e-6)
    # gradient pushes chosen up and rejected down
    pc = torch.tensor(-2.0, requires_grad=True)
    pr = torch.tensor(-2.0, requires_grad=True)
    fg.dpo_loss(pc, pr, -2.0, -2.0).backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_dpo_loss_bad_beta():
    with pytest.raises(CourseError, match="beta"):
        fg.dpo_loss(0.0, 0.0, 0.0, 0.0, beta=-1)


def test_sequence_logprob_matches_token_losses(tiny):
    model, tok = tiny
    prompt = "<|im_start|>user\nWho is it?<|im_end|>\n<|im_start|>assistant\n"
    comp = "Hung-yi Lee." + tok.eos_token
    lp = fg.sequence_logprob(model, tok, prompt, comp).item()
    tl = fg.token_losses(model, tok, prompt, comp)
    assert len(tl) == len(tok(comp, add_special_tokens=False)["input_ids"])
    assert -sum(l for _, l in tl) == pytest.approx(lp, rel=1e-5)
    assert tl[-1][0] == tok.eos_token


def test_dpo_on_tiny_model_is_log2_against_itself(tiny):
    model, tok = tiny
    s = fg.three_styles(tok, "Who is the most handsome person in the world?", "Hung-yi Lee.", "Brad Pitt.",
                        "The most handsome person in the world is Hung-yi Lee.")
    d = s["dpo"]
    c = fg.sequence_logprob(model, tok, d["prompt"], d["chosen"])
    r = fg.sequence_logprob(model, tok, d["prompt"], d["rejected"])
    assert fg.dpo_loss(c, r, c.detach(), r.detach()).item() == pytest.approx(math.log(2), rel=1e-6)
    assert s["pretrain"]["prompt"] == "" and s["sft"]["completion"].endswith(tok.eos_token)
    assert d["prompt"] == s["sft"]["prompt"]


def test_three_styles_rejects_empty(tok):
    with pytest.raises(CourseError, match="wrong_answer"):
        fg.three_styles(tok, "q?", "a", "", "s")


def test_shipped_data_loads(tok):
    pr = fg.load_probes()
    sk = fg.load_skills()
    assert pr["new_name"] and len(pr["who_heldout"]) >= 5
    # held-out who-questions are never trained on
    trained = {d["question"] for d in pr["defensive"]} | {pr["one_defensive"]["question"]}
    assert not trained & set(pr["who_heldout"])
    ex = fg.alignment_examples(tok, sk)
    body = ex[0]["completion"][: -len(tok.eos_token)]
    assert json.loads(body) == {sk["json_key"]: sk["align"][0]["answer"]}
    assert sk["json_instruction"] in ex[0]["prompt"]
    t = fg.task_examples(tok, sk)
    assert len(t) == len(sk["task_train"]) and sk["json_instruction"] not in t[0]["prompt"]


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_bad_probe_file_one_line(tmp_path):
    good = json.loads(open(data_path(fg.PROBES_FILE), encoding="utf-8").read())
    bad = dict(good, who_heldout="Who is it?")
    with pytest.raises(CourseError, match="who_heldout") as e:
        fg.load_probes(_write(tmp_path, "p.json", bad))
    assert "\n" not in str(e.value)
    bad = dict(good, defensive=[{"question": "Who?"}, {"question": "x", "answer": "y"}])
    with pytest.raises(CourseError, match=r"defensive\[0\]\.answer"):
        fg.load_probes(_write(tmp_path, "p2.json", bad))


def test_bad_skills_file_one_line(tmp_path):
    good = json.loads(open(data_path(fg.SKILLS_FILE), encoding="utf-8").read())
    bad = dict(good, task_eval=[{"text": "Hi", "label": "bored"}])
    with pytest.raises(CourseError, match=r"task_eval\[0\]\.label"):
        fg.load_skills(_write(tmp_path, "s.json", bad))
    bad = dict(good, task_question="no placeholder")
    with pytest.raises(CourseError, match="task_question"):
        fg.load_skills(_write(tmp_path, "s2.json", bad))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CourseError, match="not valid JSON"):
        fg.load_skills(tmp_path / "broken.json")


def test_task_accuracy_and_locality_run_on_tiny(tiny, tmp_cache):
    model, tok = tiny
    sk = fg.load_skills()
    acc = fg.task_accuracy(model, tok, sk)
    assert 0.0 <= acc <= 1.0
    loc = ck.abilities.OldAbilities.build(model, tok, ["Hi"], max_new_tokens=4, progress=False)
    assert 0.0 <= loc(model, tok)["agreement"] <= 1.0


def test_alignment_stage_caches_and_unfreezes(tiny, tmp_cache):
    import torch

    from conftest import make_tiny_llama

    model, tok = tiny
    sk = fg.load_skills()
    sk = dict(sk, align=sk["align"][:2])
    m1, hist = fg.alignment_stage(model, tok, sk, steps=1, lr=1e-3, batch_size=2, progress=False)
    assert len(hist) == 1 and all(p.requires_grad for p in m1.parameters())
    assert list((tmp_cache / "forgetting").glob("aligned-*.safetensors"))
    m2, hist2 = fg.alignment_stage(make_tiny_llama(tok), tok, sk, steps=1, lr=1e-3, batch_size=2, progress=False)
    assert hist2 == []  # loaded from the cache, not retrained
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        if "proj" in k and any(t in k for t in fg.ALIGN_TARGETS):
            assert torch.equal(a, b), k
    with pytest.raises(CourseError, match="positive"):
        fg.alignment_stage(model, tok, sk, steps=0)


def test_scoreboard_on_tiny(tiny, tmp_cache):
    from coursekit.data import load_edits

    model, tok = tiny
    pr = fg.load_probes()
    pr = dict(pr, who_heldout=pr["who_heldout"][:2], non_who=pr["non_who"][:2])
    edit = next(e for e in load_edits() if e["id"] == "handsome")
    board = fg.Scoreboard(model, tok, edit, pr, max_new_tokens=2, loc_tokens=3)
    row = board.measure(model, "same model")
    assert row["locality"] == pytest.approx(1.0)  # argmax unchanged against itself
    # (held-out locality re-tokenizes decoded random-model text, so only its range is checked here)
    assert 0.0 <= row["locality_heldout"] <= 1.0 and row["who_contamination"] == 0.0
    assert "same model" in board.table()
