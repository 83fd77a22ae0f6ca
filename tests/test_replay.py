"""coursekit.replay: token-mask thresholding, K-means subset determinism, cache round-trip, mixing
ratios, Magpie prefixes and bad inputs — on the tiny random Llama (seconds)."""
from __future__ import annotations

import json
import math

import pytest

from coursekit import replay as rp
from coursekit.errors import CourseError
from coursekit.finetune import collate, sft_example


def _task(tok, n=4):
    return [sft_example(tok, f"Question {i}?", f"answer {i}.") for i in range(n)]


# ------------------------------------------------------------------ token masking

def test_mask_by_ppl_threshold_and_drop():
    exs = [{"prompt": "p", "completion": "abc"}, {"prompt": "q", "completion": "de"}]
    ppl = [[("a", 1.0), ("b", 2.5), ("c", 2.51)], [("d", 9.0), ("e", 30.0)]]
    out, frac = rp.mask_by_ppl(exs, ppl, 2.5)
    assert len(out) == 1 and out[0]["mask"] == [1, 1, 0]       # 2.5 itself is kept, above is masked
    assert math.isclose(frac, 3 / 5)
    assert "mask" not in exs[0]                                # inputs are not modified
    with pytest.raises(CourseError, match="every token"):
        rp.mask_by_ppl(exs[1:], ppl[1:], 2.5)
    with pytest.raises(CourseError, match="threshold"):
        rp.mask_by_ppl(exs, ppl, 0)
    with pytest.raises(CourseError, match="perplexity lists"):
        rp.mask_by_ppl(exs, ppl[:1])


def test_token_ppl_matches_loss_and_mask_reaches_labels(tiny):
    import torch
    import torch.nn.functional as F

    model, tok = tiny
    ex = _task(tok, 1)[0]
    ppl = rp.token_ppl(model, tok, [ex])[0]
    batch = collate(tok, [ex])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1].float()
    lab = batch["labels"][0, 1:]
    nll = F.cross_entropy(logits, lab, ignore_index=-100, reduction="none")[lab != -100]
    assert [round(math.log(v), 4) for _, v in ppl] == [round(x, 4) for x in nll.tolist()]
    # a threshold between the smallest and the largest perplexity masks exactly the tokens above it
    vals = sorted(v for _, v in ppl)
    th = (vals[0] + vals[-1]) / 2
    masked, _ = rp.mask_by_ppl([ex], [ppl], th)
    kept = (collate(tok, masked)["labels"][0] != -100).sum().item()
    assert kept == sum(v <= th for _, v in ppl)
    with pytest.raises(CourseError, match="example 0"):
        rp.token_ppl(model, tok, [{"prompt": "", "completion": "x"}])


# ------------------------------------------------------------------ K-means subset

def test_kmeans_subset_deterministic_and_diverse():
    import numpy as np

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    X = np.concatenate([c + 0.1 * rng.standard_normal((5, 2)) for c in centres])
    a = rp.kmeans_subset(X, 3, seed=0)
    assert a == rp.kmeans_subset(X, 3, seed=0)
    assert sorted({i // 5 for i in a}) == [0, 1, 2]   # one pick from each blob
    with pytest.raises(CourseError, match="k"):
        rp.kmeans_subset(X, 0)
    with pytest.raises(CourseError, match="k"):
        rp.kmeans_subset(X, 16)


def test_embed_shape(tiny):
    model, tok = tiny
    E = rp.embed(model, tok, ["hello there", "a b c d"])
    assert E.shape == (2, model.config.hidden_size)


# ------------------------------------------------------------------ cache

def test_cache_round_trip(tmp_cache):
    calls = []

    def make():
        calls.append(1)
        return [{"question": "q", "answer": "a ü"}]

    a = rp.cached("pseudo", ["m", [1, 2]], make)
    b = rp.cached("pseudo", ["m", [1, 2]], make)
    assert a == b and len(calls) == 1
    files = list((tmp_cache / "replay").glob("pseudo-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == a
    rp.cached("pseudo", ["m", [1, 3]], make)               # other parts -> other file
    assert len(calls) == 2
    files[0].write_text("{broken")                          # a broken file is regenerated
    assert rp.cached("pseudo", ["m", [1, 2]], make) == a and len(calls) == 3
    with pytest.raises(CourseError, match="plain file name"):
        rp.cached("../x", [], make)


# ------------------------------------------------------------------ mixing

@pytest.mark.parametrize("ratio,k", [(0.0, 0), (0.05, 1), (0.25, 5), (0.5, 16)])
def test_mix_ratios(ratio, k):
    task = [{"prompt": "t", "completion": str(i)} for i in range(16)]
    replay = [{"prompt": "r", "completion": str(i)} for i in range(3)]
    pool = rp.mix(task, replay, ratio, seed=0)
    assert pool[:16] == task and len(pool) == 16 + k
    assert all(p in replay for p in pool[16:])
    if k >= 3:
        assert {p["completion"] for p in pool[16:19]} == {"0", "1", "2"}   # no repeat before all are used
    assert pool == rp.mix(task, replay, ratio, seed=0)


def test_mix_bad_inputs():
    task = [{"prompt": "t", "completion": "x"}]
    for bad in (1.0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(CourseError, match="ratio"):
            rp.mix(task, task, bad)
    with pytest.raises(CourseError, match="no"):
        rp.mix(task, [], 0.5)
    with pytest.raises(CourseError, match="empty"):
        rp.mix([], task, 0.5)


def test_as_examples(tok):
    ex = rp.as_examples(tok, [{"question": "Hi?", "answer": "Hello."}], suffix="Reply in JSON.")
    assert "Hi? Reply in JSON." in ex[0]["prompt"] and ex[0]["completion"].startswith("Hello.")
    with pytest.raises(CourseError, match="pair 0"):
        rp.as_examples(tok, [{"question": "Hi?"}])


# ------------------------------------------------------------------ Magpie / SSR / labels

def test_magpie_prefixes(tok):
    d = rp.magpie_prefix(tok, "default")
    b = rp.magpie_prefix(tok, "bare")
    assert d.endswith(b) and b.startswith("<|im_start|>user") and "SmolLM" in d and "SmolLM" not in b
    assert "Be brief." in rp.magpie_prefix(tok, "Be brief.")
    with pytest.raises(CourseError):
        rp.magpie_prefix(tok, None)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = rp.magpie_questions(model, tok, 2, "default", max_new_tokens=4, seed=3)
    assert a == rp.magpie_questions(model, tok, 2, "default", max_new_tokens=4, seed=3)
    with pytest.raises(CourseError, match="n must"):
        rp.sample(model, tok, "x", 0)


def test_ssr_prompt_and_first_label():
    p = rp.ssr_prompt(["A?", "B?", "C?"], "Intro\n", shots=2, offset=2)
    assert p == "Intro\nQuestion: C?\nQuestion: A?\nQuestion:"
    with pytest.raises(CourseError):
        rp.ssr_prompt([], shots=2)
    labs = ["happy", "sad", "angry"]
    assert rp.first_label("The speaker is sad, not happy.", labs) == "sad"
    assert rp.first_label('{"answer": "happy"}', labs) == "happy"
    assert rp.first_label("unhappy", labs) is None


def test_pseudo_replay_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(CourseError, match="questions"):
        rp.pseudo_replay(model, tok, [])
    with pytest.raises(CourseError, match="questions"):
        rp.pseudo_replay(model, tok, ["ok?", ""])


def test_load_replay_questions(tmp_path):
    d = rp.load_replay_questions()
    assert len(d["questions"]) >= 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": ["a", "b"], "ssr_prefix": ""}))
    with pytest.raises(CourseError, match="'questions'"):
        rp.load_replay_questions(str(bad))
    bad.write_text(json.dumps({"questions": ["a", "b", "c", "d"]}))
    with pytest.raises(CourseError, match="ssr_prefix"):
        rp.load_replay_questions(str(bad))


# ------------------------------------------------------------------ paraphrase targets

def test_checked_targets_keep_own_words_only_when_right(tok):
    ex, rows = rp._checked_targets(tok, ["Q1?", "Q2?", "Q3?"], ["happy", "sad", "angry"],
                                   ["I am happy.", "I am happy, not sad.", ""], ["happy", "sad", "angry"])
    assert [r["own"] for r in rows] == [True, False, False]
    assert [r["target"] for r in rows] == ["I am happy.", "sad.", "angry."]
    assert ex[0] == sft_example(tok, "Q1?", "I am happy.")


def test_paraphrase_examples_prompt_shows_gold_and_trains_plain_question(tiny, monkeypatch):
    model, tok = tiny
    seen = []

    def fake_generate(m, t, prompts, n):
        seen.extend(prompts)
        return ["The speaker is happy."] * len(prompts)

    monkeypatch.setattr(rp, "generate", fake_generate)
    ex, rows = rp.paraphrase_examples(model, tok, ["How does she feel?"], ["happy"], ["happy", "sad"])
    assert "Correct answer: happy." in seen[0] and "How does she feel?" in seen[0]
    assert rows[0]["own"] and ex[0] == sft_example(tok, "How does she feel?", "The speaker is happy.")
    with pytest.raises(CourseError, match="gold labels"):
        rp.paraphrase_examples(model, tok, ["a?", "b?"], ["happy"], ["happy"])
    with pytest.raises(CourseError, match="template"):
        rp.paraphrase_examples(model, tok, ["a?"], ["happy"], ["happy"], template="no fields")


# ------------------------------------------------------------------ safety replay

@pytest.mark.parametrize("text, ref", [
    ("I'm sorry, but I can't help with that.", True), ("I cannot assist with this request.", True),
    ("Sorry, I am unable to help.", True), ("I can help you with that!", False),
    ("I'm sorry for your loss.", False), ("", False)])
def test_is_refusal(text, ref):
    assert rp.is_refusal(text) is ref


def test_load_safety_and_bad_files(tmp_path):
    d = rp.load_safety()
    assert rp.is_refusal(d["refusal"]) and not set(d["harmful_eval"]) & set(d["harmful_train"])
    good = {"refusal": "I can't help with that.", "harmful_train": ["h1", "h2"], "harmful_eval": ["h3", "h4"],
            "benign_train": ["b1", "b2"], "benign_eval": ["b3", "b4"]}
    bad = tmp_path / "safety.json"
    for change, msg in [({"refusal": "Sure!"}, "'refusal'"), ({"harmful_eval": ["h3"]}, "'harmful_eval'"),
                        ({"benign_eval": ["b1", "b4"]}, "repeats a training request"),
                        ({"harmful_train": ["h1", "h1"]}, "duplicates")]:
        bad.write_text(json.dumps({**good, **change}))
        with pytest.raises(CourseError, match=msg):
            rp.load_safety(str(bad))
    bad.write_text(json.dumps(good))
    assert rp.load_safety(str(bad))["refusal"] == good["refusal"]


def test_safety_stage_trains_caches_and_refusal_rate(tok, tmp_cache):
    import torch
    from conftest import make_tiny_llama

    model = make_tiny_llama(tok)
    safety = {"refusal": "I can't help with that.", "harmful_train": ["Do harm?", "Do more harm?"],
              "harmful_eval": ["x?", "y?"], "benign_train": ["Tea?", "Cake?"], "benign_eval": ["z?", "w?"]}
    ex = rp.safety_examples(tok, safety)
    assert ex[0] == sft_example(tok, "Do harm?", "I can't help with that.")
    m1, hist, benign = rp.safety_stage(model, tok, safety, steps=1, batch_size=2, max_new_tokens=4, progress=False)
    assert len(hist) == 1 and [b["question"] for b in benign] == ["Tea?", "Cake?"]
    assert all(p.requires_grad for p in m1.parameters())
    fresh = make_tiny_llama(tok)
    m2, hist2, _ = rp.safety_stage(fresh, tok, safety, steps=1, batch_size=2, max_new_tokens=4, progress=False)
    assert hist2 == []                                  # loaded from the cache, not retrained
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    rate, outs = rp.refusal_rate(m2, tok, ["x?", "y?"], max_new_tokens=3)
    assert 0 <= rate <= 1 and len(outs) == 2
    with pytest.raises(CourseError, match="no prompts"):
        rp.refusal_rate(m2, tok, [])
