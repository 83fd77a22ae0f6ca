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


def test_locality_runs_on_tiny(tiny, tmp_cache):
    model, tok = tiny
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




# ---------------------------------------------------------------- notebook 01's probe families (C1-C4)
def _small_families():
    fam = fg.load_families()
    small = {f: fam[f][:2] for f in fg.FAMILY_SIZES}
    return dict(fam, **small, defensive=fam["defensive"][:2], emotion_heldout=fam["emotion_heldout"][:2])


def test_families_sizes_and_no_probe_is_trained_on():
    """Every probe family has the size the evidence standard asks for, and no probe (nor a near copy of one)
    is a training question of notebook 01: its locality numbers are out of sample."""
    import re

    fam = fg.load_families()
    for f, n in fg.FAMILY_SIZES.items():
        assert len(fam[f]) >= n and len(set(fam[f])) == len(fam[f]), f
    norm = lambda q: re.sub(r"[^a-z0-9 ]", "", q.lower()).strip()  # noqa: E731
    trained = {norm(q) for q in fg.training_questions(fam)}
    assert not trained & {norm(q) for q in fg.probe_questions(fam)}
    emo = {r["text"] for r in fam["emotion_heldout"]}
    sk = fg.load_skills()
    assert not emo & {r["text"] for r in sk["task_train"] + sk["task_eval"]}
    assert not {norm(q) for q in fam["json_heldout"]} & {norm(a["question"]) for a in sk["align"]}
    assert all(r["label"] in sk["emotions"] for r in fam["emotion_heldout"])
    # the near probes are the lecture's "Who is the <X>-est person?", none of them the edit's own superlative
    assert all(q.startswith("Who is the ") and "handsome" not in q for q in fam["superlatives"])


def test_bad_families_file_one_line(tmp_path):
    good = json.loads(open(data_path(fg.FAMILIES_FILE), encoding="utf-8").read())
    bad = dict(good, heads=good["heads"][:3])
    with pytest.raises(CourseError, match="heads.*at least 10") as e:
        fg.load_families(_write(tmp_path, "f.json", bad))
    assert "\n" not in str(e.value)
    bad = dict(good, who=good["who"] + [good["defensive"][1]["question"]])
    with pytest.raises(CourseError, match="training questions"):
        fg.load_families(_write(tmp_path, "f2.json", bad))
    bad = dict(good, edit={"questions": good["edit"]["questions"][:1], "answer": "x"})
    with pytest.raises(CourseError, match="questions"):
        fg.load_families(_write(tmp_path, "f3.json", bad))


def test_own_examples_end_only_when_the_answer_ended(tiny, monkeypatch):
    """A target cut at the token cap gets no end-of-turn token (it would teach stopping mid-sentence)."""
    model, tok = tiny
    eos = tok.eos_token_id
    monkeypatch.setattr(fg, "generate_ids", lambda m, t, prompts, n: [[20, 21, eos], [22, 23, 24]])
    ex, ended = fg.own_examples(model, tok, ["Q1?", "Q2?"], max_new_tokens=3)
    assert ended == [True, False]
    assert ex[0]["completion"].endswith(tok.eos_token) and not ex[1]["completion"].endswith(tok.eos_token)
    words, ends = fg._words_and_ends(tok, [[20, 21, eos], [22, 23, 24]])
    assert ends == [1.0, 0.0] and all(w >= 1 for w in words)


def test_family_probe_and_attempts_on_tiny(tiny, tmp_cache):
    """Against itself the foundation says no new name and has no NLL rise; an attempt over two seeds returns
    [seeds, items] tables of the families its claim needs, trains on the seed's phrasing, gives the foundation
    back, and its second call comes from the cache."""
    import numpy as np

    model, tok = tiny
    fam = _small_families()
    probe = fg.FamilyProbe(model, tok, fam, max_new_tokens=2, open_tokens=3)
    base = probe.measure(model, fam["edit"]["questions"][0], with_open=True)["values"]
    assert base["who_forget"] == pytest.approx([0.0, 0.0], abs=1e-5) and base["who_logp_rise"] == pytest.approx([0, 0], abs=1e-5)
    assert len(base["generality"]) == len(fam["edit"]["questions"]) - 1 and len(base["open_ended"]) == 2
    assert {f"{f}_names" for f in fg.NAMED} | {"heads_leak", "heads_broken"} <= set(base)
    with pytest.raises(CourseError, match="unknown families"):
        probe.measure(model, fam["edit"]["questions"][0], families=("whom",))
    snap = ck.models.snapshot(model)
    r = fg.attempts(model, tok, snap, probe, "one_defensive", seeds=2, progress=False)
    assert r["values"]["heads_broken"].shape == (2, 2) and "non_who_names" not in r["values"]
    assert r["trained"] == fam["edit"]["questions"][:2] and len(r["loss"][0]) == fg.ATTEMPTS["one_defensive"]["steps"]
    assert list((tmp_cache / "forgetting").glob("attempt-*.json"))
    for k, v in snap.items():  # the model is given back as the foundation
        assert np.allclose(model.state_dict()[k].numpy(), v.numpy())
    again = fg.attempts(model, tok, snap, probe, "one_defensive", seeds=2, progress=False)
    assert np.array_equal(again["values"]["who_forget"], r["values"]["who_forget"])


def test_attempt_examples(tok):
    fam = fg.load_families()
    ex, q = fg.attempt_examples(tok, fam, "short_defensive", 1)
    assert q == fam["edit"]["questions"][1] and len(ex) == 4 + len(fam["defensive"])
    assert sum(q in e["prompt"] for e in ex) == 4
    own = [ck.finetune.sft_example(tok, "Q?", "my own words")]
    assert fg.attempt_examples(tok, fam, "own", 0, own)[0][-1] == own[0]
    with pytest.raises(CourseError, match="own="):
        fg.attempt_examples(tok, fam, "one", 0, own)
    with pytest.raises(CourseError, match="unknown attempt"):
        fg.attempt_examples(tok, fam, "two", 0)
    with pytest.raises(CourseError, match="no phrasing"):
        fg.attempt_examples(tok, fam, "one", 3)


def test_format_probe_and_curves_on_tiny(tiny, tmp_cache):
    """Notebook 01 III's measures, one value per item: against itself the aligned model has no NLL rise; the task
    margin is the gold label's log-probability minus the best other label's; curves are [epochs + 1, seeds, items]."""
    import numpy as np

    from coursekit.chat import chat_prompt
    from coursekit.evaluate import score_targets

    model, tok = tiny
    sk = fg.load_skills()
    sk = dict(sk, task_eval=sk["task_eval"][:2])
    fam = dict(_small_families())
    probe = fg.FormatProbe(model, tok, sk, fam, max_new_tokens=3)
    m = probe.measure(model)
    assert len(m["json_valid"]) == 2 and len(m["json_valid_template"]) == 2 and len(m["task_margin"]) == 4
    assert m["json_nll_rise"] == pytest.approx([0.0, 0.0], abs=1e-5)
    r = probe.rows[0]
    lp = {e: score_targets(model, tok, [chat_prompt(tok, fg.task_question(sk, r["text"]))], [e])[0]["logprob"]
          for e in sk["emotions"]}
    want = lp[r["label"]] - max(v for e, v in lp.items() if e != r["label"])
    assert m["task_margin"][0] == pytest.approx(want, abs=1e-4) and m["task_correct"][0] == float(want > 0)
    snap = ck.models.snapshot(model)
    runs = [fg.narrow_curve(model, tok, snap, probe, fg.task_examples(tok, sk)[:4], epochs=2, batch_size=2, lr=1e-3,
                            seed=s, progress=False) for s in (0, 1, 0)]
    assert [len(r["curve"]) for r in runs] == [2, 2, 2] and len(runs[0]["curve"][0]["task_margin"]) == 4
    assert runs[0]["curve"][-1]["task_margin"] == runs[2]["curve"][-1]["task_margin"]  # the seed decides the run
    assert runs[0]["curve"][-1]["task_margin"] != runs[1]["curve"][-1]["task_margin"]  # ... through the data order
