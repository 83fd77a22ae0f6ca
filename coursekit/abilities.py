"""The course's one measure of **old abilities** (forgetting), shared by notebooks 01, 02, 03 and 05.

What the foundation model already does is its own greedy answers to varied instructions
(``data/old_abilities.json``: facts, how-to, open questions, small tasks; a ``fit`` half for anything a
method fits — Fishers, replay pools, λ choices — and a disjoint ``eval`` half that measures). The answers
are generated once (greedy, ≥ 24 tokens, cut after the end-of-turn token) and cached by
:mod:`coursekit.cache`. For a changed model, per item:

* ``forgetting`` — the rise of the mean per-token negative log-likelihood of the foundation's own answer
  (nats/token; 0 = unchanged; Kalajdzievski 2024's forgetting metric),
* ``kl`` — KL(p₀‖p) per token at the same positions: how far the whole next-token distribution moved,
  not only the chosen token (p₀ is kept as its top-``topk`` tokens plus one "rest" bucket, so this is the KL
  of the two distributions coarsened to those buckets: a lower bound of the full KL, equal to it when
  ``topk`` is the vocabulary),
* ``agreement`` — teacher-forced token accuracy of the answer (1 = every token still the argmax).

Per-item values are kept (:meth:`OldAbilities.per_item`) so that notebooks put intervals on them
(:mod:`coursekit.evidence`). ``OldAbilities.build(foundation, tok)`` uses the ``eval`` half;
``split="fit"`` the other; ``questions=[...]`` any list (notebooks that have not moved to the shared
set yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .chat import chat_prompt, generate_ids
from .errors import CourseError

DATA_FILE = "old_abilities.json"
KINDS = ("fact", "howto", "open", "task")
SPLITS = ("fit", "eval")


def load_old_abilities(name: str = DATA_FILE) -> dict:
    """``{"fit": [...], "eval": [...]}`` of ``{id, kind, instruction}`` records, validated: unique ids,
    known kinds, non-empty instructions, the two halves disjoint."""
    from .data import field_fail, load_json

    d = load_json(name)
    seen_ids, seen_text = set(), {}
    for split in SPLITS:
        recs = d.get(split) if isinstance(d, dict) else None
        if not isinstance(recs, list) or not recs:
            field_fail(name, split, "must be a non-empty list of {id, kind, instruction} objects")
        for i, r in enumerate(recs):
            where = f"{split}[{i}]"
            if not isinstance(r, dict):
                field_fail(name, where, "must be an object with id, kind, instruction")
            if not isinstance(r.get("id"), str) or r["id"] in seen_ids:
                field_fail(name, where, f"needs a unique string id (got {r.get('id')!r})")
            if r.get("kind") not in KINDS:
                field_fail(name, f"{where}.kind", f"must be one of {', '.join(KINDS)} (got {r.get('kind')!r})")
            text = r.get("instruction")
            if not isinstance(text, str) or not text.strip():
                field_fail(name, f"{where}.instruction", "must be a non-empty string")
            norm = " ".join(text.lower().split())
            if norm in seen_text:
                field_fail(name, f"{where}.instruction", f"repeats {seen_text[norm]}")
            seen_ids.add(r["id"])
            seen_text[norm] = r["id"]
    return {s: d[s] for s in SPLITS}


def _answer_logprobs(model, tok, prompts: Sequence[list[int]], answers: Sequence[list[int]], batch_size: int):
    """Per item: log-softmax rows ``[len(answer), vocab]`` at the answer's positions (teacher forced),
    batched by length with right padding; yields ``(index, logp)`` (not in index order)."""
    import torch

    from .evaluate import span_logits

    for i, lg in span_logits(model, tok, [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts],
                             batch_size):
        yield i, torch.log_softmax(lg, -1)


@dataclass
class OldAbilities:
    """The foundation model's own answers to a question set, and how much a changed model forgot them.

    >>> old = OldAbilities.build(foundation, tok)          # eval half of data/old_abilities.json
    >>> old(model, tok)          # {'forgetting': ..., 'kl': ..., 'agreement': ...}  (means)
    >>> old.per_item(model, tok) # the same, one value per item, for intervals
    """

    questions: list
    prompts: list
    answers: list  # token ids of the foundation's greedy answers
    reference: list  # the same answers as text (for reading, and for Fishers / replay pools)
    base_nll: list  # per item: mean per-token NLL of its answer under the foundation model
    top_ids: list = field(default_factory=list, repr=False)  # per item [n, topk] ids of p0
    top_logp: list = field(default_factory=list, repr=False)  # per item [n, topk] log p0
    batch_size: int = 16

    @classmethod
    def build(cls, foundation, tok, questions: Sequence[str] | None = None, split: str = "eval",
              max_new_tokens: int = 32, topk: int = 256, batch_size: int = 16,
              progress: bool | str = "old abilities", items: int | None = None,
              answer_tokens: int | None = None) -> "OldAbilities":
        """Generate (once, cached) the foundation's greedy answers and keep what scoring needs.

        ``items`` keeps the first items and ``answer_tokens`` the first tokens of each answer, after the
        answers of the whole set were generated (so the cached answers are shared with the full set):
        a cheaper measure for notebooks that score after every training step."""
        import torch

        from . import cache

        if questions is None:
            if split not in SPLITS:
                raise CourseError(f"OldAbilities.build(): split must be one of {SPLITS} (got {split!r})")
            questions = [r["instruction"] for r in load_old_abilities()[split]]
        qs = list(questions)
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise CourseError("OldAbilities.build(): questions must be a non-empty list of non-empty strings")
        if not isinstance(topk, int) or topk < 1:
            raise CourseError(f"OldAbilities.build(): topk must be a positive int (got {topk!r})")
        prompts = [chat_prompt(tok, q) for q in qs]
        answers = cache.json("abilities/answers", {"prompts": prompts, "max_new_tokens": max_new_tokens},
                             lambda: generate_ids(foundation, tok, prompts, max_new_tokens, progress=progress),
                             code=[generate_ids], weights=foundation)
        answers = [a if a else [tok.eos_token_id] for a in answers]
        for name, v in (("items", items), ("answer_tokens", answer_tokens)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise CourseError(f"OldAbilities.build(): {name} must be a positive int (got {v!r})")
        qs, prompts, answers = qs[:items], prompts[:items], [a[:answer_tokens] for a in answers[:items]]
        p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n = len(qs)
        base_nll, top_ids, top_logp = [0.0] * n, [None] * n, [None] * n
        k = min(topk, foundation.config.vocab_size)
        for i, logp in _answer_logprobs(foundation, tok, p_ids, answers, batch_size):
            a = torch.tensor(answers[i])
            base_nll[i] = -logp.gather(1, a[:, None]).mean().item()
            top_logp[i], top_ids[i] = logp.topk(k, -1)
        text = tok.batch_decode(answers, skip_special_tokens=True)
        return cls(questions=qs, prompts=prompts, answers=answers, reference=[t.strip() for t in text],
                   base_nll=base_nll, top_ids=top_ids, top_logp=top_logp, batch_size=batch_size)

    def per_item(self, model, tok, prompt_fn_for=None) -> dict:
        """``{"forgetting": [...], "kl": [...], "agreement": [...]}``: one value per item.

        ``prompt_fn_for(i)`` (optional) gives item ``i``'s prompt_fn(question, prefix) instead of the plain
        chat prompt — how much a *prompting* method (a note in the system prompt, retrieval) moves the
        foundation's answers to unrelated questions, with no weight changed."""
        import torch

        prompts = self.prompts if prompt_fn_for is None else [
            prompt_fn_for(i)(q, "") for i, q in enumerate(self.questions)]
        p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = {k: [0.0] * len(self.answers) for k in ("forgetting", "kl", "agreement")}
        for i, logp in _answer_logprobs(model, tok, p_ids, self.answers, self.batch_size):
            a = torch.tensor(self.answers[i])
            out["forgetting"][i] = -logp.gather(1, a[:, None]).mean().item() - self.base_nll[i]
            out["agreement"][i] = (logp.argmax(-1) == a).float().mean().item()
            out["kl"][i] = coarse_kl(self.top_logp[i], logp.gather(1, self.top_ids[i])).mean().item()
        return out

    def __call__(self, model, tok) -> dict:
        """Means over items of :meth:`per_item`."""
        return {k: sum(v) / len(v) for k, v in self.per_item(model, tok).items()}


def coarse_kl(logp0_top, logp_top):
    """Per position KL(p₀‖p) over p₀'s top tokens plus one bucket for the rest (a lower bound of the full
    KL; equal to it when the top tokens are the whole vocabulary). Inputs ``[n, k]`` log-probabilities
    of the same tokens under p₀ and p."""
    import torch

    p0 = logp0_top.exp()
    kl = (p0 * (logp0_top - logp_top)).sum(-1)
    rest0 = (1 - p0.sum(-1)).clamp_min(0)
    rest = (1 - logp_top.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(rest0 > 1e-12, rest0 * (torch.log(rest0.clamp_min(1e-30)) - torch.log(rest)),
                       torch.zeros_like(rest0))
    return (kl + tail).clamp_min(0)
