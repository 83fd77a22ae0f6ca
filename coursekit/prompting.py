"""The best post-training is no post-training: changing behaviour with the prompt alone.

* in-context instruction: every note goes into the system prompt of every question;
* retrieval (RAG): a TF-IDF retriever picks the most similar note, and only if it is similar enough.
"""
from __future__ import annotations

from typing import Sequence

from .chat import chat_prompt

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
