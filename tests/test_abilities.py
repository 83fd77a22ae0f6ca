"""The shared old-abilities measure: data file, per-item NLL rise / KL / agreement, cached answers."""
from __future__ import annotations

import json

import pytest
import torch

from coursekit import abilities as ab
from coursekit.errors import CourseError


def test_data_file_has_two_disjoint_halves():
    d = ab.load_old_abilities()
    assert len(d["fit"]) >= 60 and len(d["eval"]) >= 60
    fit = {r["instruction"] for r in d["fit"]}
    assert not fit & {r["instruction"] for r in d["eval"]}


def test_bad_data_file_is_one_line(tmp_path):
    bad = {"fit": [{"id": "a", "kind": "fact", "instruction": "Explain X."}],
           "eval": [{"id": "b", "kind": "poem", "instruction": "Write Y."}]}
    p = tmp_path / "old.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(CourseError, match=r"eval\[0\]\.kind"):
        ab.load_old_abilities(p)
    bad["eval"][0] = {"id": "b", "kind": "fact", "instruction": "explain  x."}
    p.write_text(json.dumps(bad))
    with pytest.raises(CourseError, match="repeats a"):
        ab.load_old_abilities(p)


def test_foundation_forgets_nothing_and_a_changed_model_does(tiny, tmp_cache):
    model, tok = tiny
    qs = ["Explain how rain forms.", "Give two tips for cooking rice.", "Describe a calm morning."]
    old = ab.OldAbilities.build(model, tok, qs, max_new_tokens=6, progress=False)
    assert len(old.answers) == 3 and all(1 <= len(a) <= 6 for a in old.answers)
    same = old.per_item(model, tok)
    assert set(same) == {"forgetting", "kl", "agreement"} and all(len(v) == 3 for v in same.values())
    assert same["forgetting"] == pytest.approx([0, 0, 0], abs=1e-5) and max(same["kl"]) < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moved = old(model, tok)
    assert moved["kl"] > 1e-4 and moved["forgetting"] != pytest.approx(0, abs=1e-4)
    again = ab.OldAbilities.build(model, tok, qs, max_new_tokens=6, progress=False)  # other weights: new answers
    assert len(list((tmp_cache / "abilities").glob("answers-*.json"))) == 2 and again.questions == qs


def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    lp0 = torch.log_softmax(torch.randn(5, 50, generator=g) * 3, -1)
    lp = torch.log_softmax(torch.randn(5, 50, generator=g) * 3, -1)
    full = (lp0.exp() * (lp0 - lp)).sum(-1)
    ix = torch.argsort(lp0, -1, descending=True)
    exact = ab.coarse_kl(lp0.gather(1, ix), lp.gather(1, ix))
    assert torch.allclose(exact, full, atol=1e-5)
    top = ab.coarse_kl(lp0.gather(1, ix[:, :8]), lp.gather(1, ix[:, :8]))
    assert (top <= full + 1e-5).all() and (top >= 0).all()


def test_build_rejects_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(CourseError, match="split"):
        ab.OldAbilities.build(model, tok, split="test")
    with pytest.raises(CourseError, match="non-empty"):
        ab.OldAbilities.build(model, tok, [""])


def test_scores_keep_the_item_order_whatever_the_length_batching(tiny):
    """Items are batched by length; every result must come back at its own index."""
    from coursekit.evaluate import score_targets

    model, tok = tiny
    prompts = ["a", "a b c d e f g h", "a b", "a b c d e f g h i j k l m", "x"]
    targets = [" yes", " no", " maybe so", " ok", " fine"]
    together = score_targets(model, tok, prompts, targets, batch_size=2)
    alone = [score_targets(model, tok, [p], [t])[0] for p, t in zip(prompts, targets)]
    assert [r["pred"] for r in together] == [r["pred"] for r in alone]
    assert [r["logprob"] for r in together] == pytest.approx([r["logprob"] for r in alone], abs=1e-4)
