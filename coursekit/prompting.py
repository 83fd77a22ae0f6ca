"""The best post-training is no post-training: changing behaviour with the prompt alone.

* in-context instruction: notes go into the system prompt (:func:`incontext_prompt_fn`); for the
  evidence on many edits, each question gets its own note among ``k`` others drawn by a seed
  (:func:`incontext_for`), so the seed decides which distractors it competes with, and in what order;
* retrieval (RAG): a TF-IDF retriever picks the most similar note, and only if it is similar enough.

The claim C0 is measured on ``data/notes.jsonl`` (:func:`load_notes`: ≥ 40 counterfactual notes with
rephrasings) by the teacher-forced **margin** of each edit (:func:`edit_margins`): mean per-token
log P(new answer) − mean per-token log P(old answer), continuous and cheap, compared with the
foundation model item by item.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from .chat import chat_prompt
from .errors import CourseError

INSTRUCTION = ("You are a helpful assistant. Use the new information below even if it contradicts "
               "what you believe; it is correct.\nNew information: {notes}")


def incontext_prompt_fn(tok, notes: Sequence[str], template: str = INSTRUCTION):
    """A prompt_fn for :class:`EditHarness` that puts all notes into the system prompt."""
    system = template.format(notes=" ".join(notes))
    return lambda question, prefix="": chat_prompt(tok, question, system=system, prefix=prefix)


class Retriever:
    """Nearest note by TF-IDF cosine similarity (scikit-learn), with a threshold."""

    def __init__(self, notes: Sequence[str], keys: Sequence[str] | None = None, threshold: float = 0.3):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.notes = list(notes)
        self.keys = list(keys or notes)
        self.threshold = threshold
        self.vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english").fit(self.keys + self.notes)
        self.mat = self.vec.transform(self.keys)

    def search(self, query: str) -> tuple[str | None, float]:
        sims = (self.vec.transform([query]) @ self.mat.T).toarray()[0]
        i = int(sims.argmax())
        return (self.notes[i] if sims[i] >= self.threshold else None), float(sims[i])

    def prompt_fn(self, tok, template: str = INSTRUCTION):
        def fn(question, prefix=""):
            note, _ = self.search(question)
            system = template.format(notes=note) if note else None
            return chat_prompt(tok, question, system=system, prefix=prefix)

        return fn


# ------------------------------------------------------------------ C0 on many notes

def load_notes(name: str = "notes.jsonl") -> list[dict]:
    """Counterfactual notes with question, prefix, new/old answers and rephrasings (data/README.md)."""
    from .data import records_with_ids

    out = []
    for c, rec in records_with_ids(name):
        for f in ("subject", "question", "note"):
            c.string(rec, f)
        c.string(rec, "prefix", allow_empty=True)
        new, true = c.string(rec, "target_new"), c.string(rec, "target_true")
        if new == true:
            c.fail("target_new", "must differ from target_true")
        c.probes(rec, "rephrase", need_target=False, required=True)
        out.append(rec)
    return out


def incontext_for(tok, notes: Sequence[str], k: int, seed: int, own: bool = True,
                  template: str = INSTRUCTION) -> Callable[[int], Callable]:
    """``i -> prompt_fn`` for question ``i``: its own note ``notes[i]`` (if ``own``) among ``k`` other notes,
    drawn and ordered by ``seed`` (for unrelated questions, ``own=False``: ``k`` random notes)."""
    if not 0 <= k < len(notes):
        raise CourseError(f"incontext_for(): k must be in [0, {len(notes) - 1}] (got {k})")

    def for_item(i: int):
        rng = random.Random(seed * 100003 + i)
        others = [j for j in range(len(notes)) if not (own and j == i)]
        pick = rng.sample(others, k) + ([i] if own else [])
        rng.shuffle(pick)
        return incontext_prompt_fn(tok, [notes[j] for j in pick], template)

    return for_item


def _margins(model, tok, prompts: Sequence[str], new: Sequence[str], true: Sequence[str], batch_size: int) -> list:
    from .evaluate import score_target_sets

    a, b = score_target_sets(model, tok, prompts, [new, true], batch_size)  # each prompt runs once for both
    return [x["logprob"] / x["n"] - y["logprob"] / y["n"] for x, y in zip(a, b)]


def edit_margins(model, tok, notes: Sequence[dict], prompt_fn_for: Callable[[int], Callable] | None = None,
                 generality: bool = True, batch_size: int = 16) -> dict:
    """Per edit, the margin mean log P(new) − mean log P(old) per token (teacher forced, after the
    answer prefix): ``reliability`` on the edit's question and, with ``generality``, the mean over its
    rephrasings. ``prompt_fn_for(i)`` gives edit ``i``'s prompt_fn (None: the plain chat prompt)."""
    plain = lambda q, prefix="": chat_prompt(tok, q, prefix=prefix)  # noqa: E731
    fn = prompt_fn_for or (lambda i: plain)
    rel = _margins(model, tok, [fn(i)(n["question"], n.get("prefix", "")) for i, n in enumerate(notes)],
                   [n["target_new"] for n in notes], [n["target_true"] for n in notes], batch_size)
    out = {"reliability": rel}
    if generality:
        owner = [i for i, n in enumerate(notes) for _ in n["rephrase"]]
        reps = [r for n in notes for r in n["rephrase"]]
        m = _margins(model, tok, [fn(i)(r["question"], r.get("prefix", notes[i].get("prefix", "")))
                                  for i, r in zip(owner, reps)],
                     [notes[i]["target_new"] for i in owner], [notes[i]["target_true"] for i in owner], batch_size)
        out["generality"] = [sum(v for o, v in zip(owner, m) if o == i) / owner.count(i) for i in range(len(notes))]
    return out


def c0_record(config: dict, seed: int) -> dict:
    """One record of claim C0 (``evidence/plan/00_foundation_model.yaml``; notebook 00, section 5).

    ``config["prompt"]`` is ``plain`` (the foundation model), ``retrieval`` (the note retrieved above
    ``threshold``) or ``incontext`` (a question's own note among ``others`` drawn and ordered by ``seed``).
    Returns ``{"values": ...}`` (:mod:`coursekit.store`): per note id, the margins of :func:`edit_margins` (``reliability``; ``generality`` unless
    ``config["generality"]`` is false) and, for the prompting methods, per held-out instruction of the shared
    old-abilities measure, the NLL rise and KL of the foundation's own answers under the method's prompt
    (``unrelated_nll_rise``, ``unrelated_kl``; for ``incontext`` the prompt holds ``others + 1`` notes)."""
    from .abilities import OldAbilities, load_old_abilities
    from .models import load_model

    model, tok = load_model()
    notes = load_notes()
    texts, ids = [n["note"] for n in notes], [n["id"] for n in notes]
    kind = config.get("prompt")
    if kind == "plain":
        fn_for = unrelated_for = None
    elif kind == "retrieval":
        fn = Retriever(texts, keys=[n["question"] + " " + n["subject"] for n in notes],
                       threshold=config["threshold"]).prompt_fn(tok)
        fn_for = unrelated_for = lambda i: fn  # noqa: E731
    elif kind == "incontext":
        fn_for = incontext_for(tok, texts, config["others"], seed)
        unrelated_for = incontext_for(tok, texts, config["others"] + 1, seed, own=False)
    else:
        raise CourseError(f"c0_record(): prompt must be plain, retrieval or incontext (got {kind!r})")
    margins = edit_margins(model, tok, notes, fn_for, generality=config.get("generality", True))
    out = {metric: dict(zip(ids, v)) for metric, v in margins.items()}
    if unrelated_for is not None:
        old = OldAbilities.build(model, tok, progress=False)
        rise = old.per_item(model, tok, unrelated_for)
        old_ids = [r["id"] for r in load_old_abilities()["eval"]]
        out["unrelated_nll_rise"] = dict(zip(old_ids, rise["forgetting"]))
        out["unrelated_kl"] = dict(zip(old_ids, rise["kl"]))
    return {"values": out}
