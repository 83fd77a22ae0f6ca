"""The lecture's three goals as one evaluation harness — reliability, generality, locality.

All scores are **teacher-forced** (no generation), batched, and return plain data:

* token accuracy (EasyEdit): feed ``prompt + target`` and count target positions whose argmax is the
  target token — used for reliability and generality (rephrase, reversal, portability);
* locality (EasyEdit): the argmax tokens on ``locality prompt + answer`` before vs after the change,
  fraction unchanged — needs the foundation model's predictions as a *reference*;
* probability comparison (ROME/CounterFact): ``P(target_new) > P(target_true)``.

Plus small helpers later notebooks use: answer length, JSON validity, and how often a string leaks into
answers. Forgetting itself is the course's one old-abilities measure, :mod:`coursekit.abilities`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .chat import chat_prompt, length_batches
from .errors import CourseError

KINDS = ("reliability", "rephrase", "reversal", "portability", "locality")
GENERALITY = ("rephrase", "reversal", "portability")


def _device(model):
    return next(model.parameters()).device


def pad_right(tok, seqs: Sequence[list[int]]):
    """``(input_ids, attention_mask)`` of token-id lists, right-padded to the longest."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q)
        att[i, : len(q)] = 1
    return ids, att


def logits_at(model, ids, att, spans: Sequence[tuple[int, int]], prefix=None) -> list:
    """Float32 next-token logits of row ``i`` at positions ``spans[i] = (start, end)`` only.

    Runs the decoder once and applies the output layer only where a score is needed: the vocabulary
    projection of every padded position (49k columns) is a third of a scoring pass on SmolLM2 and teaches
    nothing. ``prefix``: the key/value cache of tokens that precede every row (:func:`prefix_cache`);
    ``ids`` then continue it and ``spans`` count from its end."""
    import copy

    import torch

    dev = _device(model)
    kw: dict = {"use_cache": False}
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(ids.shape[0])
        k = cache.get_seq_length()
        att = torch.cat([torch.ones(ids.shape[0], k, dtype=att.dtype), att], 1)
        kw = {"past_key_values": cache, "use_cache": True,
              "position_ids": (k + torch.arange(ids.shape[1]))[None].expand(ids.shape[0], -1).to(dev)}
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw).last_hidden_state
        rows = torch.cat([hidden[i, a:b] for i, (a, b) in enumerate(spans)])
        logits = model.get_output_embeddings()(rows).float()
    return list(torch.split(logits, [b - a for a, b in spans]))


MIN_SHARED_PREFIX = 4  # below this, a separate prefix pass saves less than it costs


def shared_prefix(seqs: Sequence[list[int]], limit: int) -> int:
    """Length of the leading run of tokens that every sequence in ``seqs`` shares, at most ``limit``."""
    k, first = 0, seqs[0]
    while k < limit and all(len(s) > k and s[k] == first[k] for s in seqs):
        k += 1
    return k


def prefix_cache(model, prefix: list[int]):
    """The decoder's key/value cache after ``prefix`` (one row), for :func:`logits_at`."""
    import torch

    with torch.no_grad():
        return model.get_decoder()(input_ids=torch.tensor([prefix], device=_device(model)),
                                   use_cache=True).past_key_values


def span_logits(model, tok, seqs: Sequence[list[int]], starts: Sequence[int], batch_size: int = 16,
                share_prefix: bool = True):
    """Yield ``(i, logits)``: the float32 logits that predict ``seqs[i][starts[i]:]`` (teacher forced), batched
    by length with right padding, in batch order (not index order).

    Scored prompts share a chat template: SmolLM2's system block is the same 8-30 tokens in front of every
    item. That run goes through the decoder once per call and every batch continues from a copy of its
    key/value cache (``share_prefix=False`` recomputes it per row): same numbers up to float rounding
    (tested), a quarter to a third fewer decoder tokens on the course's items."""
    if not seqs:
        return
    if any(not 0 < a < len(s) for a, s in zip(starts, seqs)):
        raise CourseError("span_logits(): every start must fall inside its sequence, after its first token")
    k = shared_prefix(seqs, min(starts) - 1) if share_prefix else 0
    pre = prefix_cache(model, list(seqs[0][:k])) if k >= MIN_SHARED_PREFIX else None
    k = k if pre is not None else 0
    for idx in length_batches([len(s) - k for s in seqs], batch_size):
        ids, att = pad_right(tok, [seqs[i][k:] for i in idx])
        spans = [(starts[i] - 1 - k, len(seqs[i]) - 1 - k) for i in idx]
        yield from zip(idx, logits_at(model, ids, att, spans, pre))


def _encode_pairs(tok, prompts: Sequence[str], target_sets: Sequence[Sequence[str]], caller: str):
    """Token ids of the prompts and of every target set (each as long as the prompts, no empty target)."""
    P = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sets = []
    for targets in target_sets:
        if len(prompts) != len(targets):
            raise CourseError(f"{caller}(): {len(prompts)} prompts but {len(targets)} targets")
        T = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
        for t, tgt in zip(T, targets):
            if not t:
                raise CourseError(f"{caller}(): target {tgt!r} has no tokens")
        sets.append(T)
    return P, sets


def _target_score(logits, target: list[int]) -> dict:
    """One row of :func:`score_targets` from the logits ``[len(target), vocab]`` that predict the target."""
    import torch

    tgt = torch.tensor(target, device=logits.device)
    pred = logits.argmax(-1)
    lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
    return {
        "acc": (pred == tgt).float().mean().item(),
        "logprob": lp.sum().item(),
        "token_logprobs": lp.tolist(),
        "n": len(target),
        "pred": pred.tolist(),
    }


def score_targets(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16) -> list[dict]:
    """Teacher-forced scores of ``targets`` as continuations of ``prompts``.

    Returns per pair: ``acc`` (fraction of target tokens predicted by argmax), ``logprob`` (sum of
    target-token log-probabilities), ``token_logprobs`` (the same, one per token), ``n`` (target tokens),
    ``pred`` (argmax ids at target positions).
    """
    P, (T,) = _encode_pairs(tok, prompts, [targets], "score_targets")
    out: list = [None] * len(P)
    for i, lg in span_logits(model, tok, [p + t for p, t in zip(P, T)], [len(p) for p in P], batch_size):
        out[i] = _target_score(lg, T[i])
    return out


def score_target_sets(model, tok, prompts: Sequence[str], target_sets: Sequence[Sequence[str]],
                      batch_size: int = 16) -> list[list[dict]]:
    """:func:`score_targets` for several targets per prompt: ``out[j][i]`` scores ``target_sets[j][i]`` after
    ``prompts[i]`` (e.g. the new and the old answer of an edit).

    Each prompt goes through the decoder once; every target set continues from a copy of its key/value cache.
    Two short answers after a long prompt (a system prompt with notes) then cost one long pass instead of two.
    Same numbers as :func:`score_targets` up to float rounding (tested)."""
    import copy

    import torch

    P, sets = _encode_pairs(tok, prompts, target_sets, "score_target_sets")
    out: list = [[None] * len(P) for _ in sets]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dev, dec, head = _device(model), model.get_decoder(), model.get_output_embeddings()
    for idx in length_batches([len(p) for p in P], batch_size):
        n_p = torch.tensor([len(P[i]) for i in idx])
        ids = torch.full((len(idx), int(n_p.max())), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding: every prompt ends at the last column
            ids[r, ids.shape[1] - len(P[i]):] = torch.tensor(P[i])
            att[r, ids.shape[1] - len(P[i]):] = 1
        with torch.no_grad():
            o = dec(input_ids=ids.to(dev), attention_mask=att.to(dev),
                    position_ids=(att.cumsum(-1) - 1).clamp_min(0).to(dev), use_cache=True)
            first = head(o.last_hidden_state[:, -1]).float()  # predicts every target's first token
            for j, T in enumerate(sets):
                tids, tatt = pad_right(tok, [T[i] for i in idx])
                cache = copy.deepcopy(o.past_key_values) if j < len(sets) - 1 else o.past_key_values
                h = dec(input_ids=tids.to(dev), attention_mask=torch.cat([att, tatt], 1).to(dev),
                        position_ids=(n_p[:, None] + torch.arange(tids.shape[1])).to(dev),
                        past_key_values=cache, use_cache=True).last_hidden_state
                for r, i in enumerate(idx):
                    lg = torch.cat([first[r : r + 1], head(h[r, : len(T[i]) - 1]).float()])
                    out[j][i] = _target_score(lg, T[i])
    return out


def token_accuracy(model, tok, prompts, targets, batch_size: int = 16) -> float:
    """Mean teacher-forced token accuracy of targets given prompts."""
    r = score_targets(model, tok, prompts, targets, batch_size)
    return sum(x["acc"] for x in r) / max(len(r), 1)


PromptFn = Callable[[str, str], str]


def default_prompt_fn(tok) -> PromptFn:
    """question, prefix -> chat prompt with the template's default system prompt."""
    return lambda question, prefix="": chat_prompt(tok, question, prefix=prefix)


@dataclass
class HarnessResult:
    summary: dict
    rows: list = field(default_factory=list)

    def __getitem__(self, k):
        return self.summary[k]

    def table(self) -> str:
        keys = ["edit", "kind", "question", "target", "acc", "unchanged"]
        lines = [" | ".join(keys)]
        for r in self.rows:
            lines.append(" | ".join(str(r.get(k, ""))[:60] for k in keys))
        return "\n".join(lines)


class EditHarness:
    """Reliability / generality / locality for a list of edit requests (``data.load_edits()``).

    >>> h = EditHarness(tok, edits)
    >>> ref = h.reference(model)            # foundation model's predictions, for locality
    >>> h.evaluate(model, ref).summary      # {'reliability': ..., 'generality': ..., 'locality': ...}
    """

    def __init__(self, tok, edits: list[dict], batch_size: int = 16):
        self.tok = tok
        self.edits = edits
        self.batch_size = batch_size
        self.probes: list[dict] = []
        for e in edits:
            self.probes.append(dict(edit=e["id"], kind="reliability", question=e["question"],
                                    prefix=e.get("prefix", ""), target=e["target_new"],
                                    target_true=e.get("target_true")))
            for p in e.get("rephrase", []):
                self.probes.append(dict(edit=e["id"], kind="rephrase", question=p["question"],
                                        prefix=p.get("prefix", e.get("prefix", "")),
                                        target=p.get("target", e["target_new"]),
                                        target_true=p.get("target_true", e.get("target_true"))))
            for kind in ("reversal", "portability", "locality"):
                for p in e.get(kind, []):
                    self.probes.append(dict(edit=e["id"], kind=kind, question=p["question"],
                                            prefix=p.get("prefix", ""), target=p["target"],
                                            target_true=p.get("target_true")))

    def _prompts(self, prompt_fn: PromptFn | None, probes):
        fn = prompt_fn or default_prompt_fn(self.tok)
        return [fn(p["question"], p["prefix"]) for p in probes]

    def reference(self, model, prompt_fn: PromptFn | None = None) -> list[list[int]]:
        """The foundation model's argmax predictions on every locality probe.

        With the default chat prompt (``prompt_fn=None``) locality measures change against the
        foundation model as people normally use it — also when :meth:`evaluate` adds notes to the
        prompt. Pass the same ``prompt_fn`` as to :meth:`evaluate` to compare like with like (e.g.
        completion-style prompts for model editing)."""
        loc = [p for p in self.probes if p["kind"] == "locality"]
        r = score_targets(model, self.tok, self._prompts(prompt_fn, loc), [p["target"] for p in loc], self.batch_size)
        return [x["pred"] for x in r]

    def evaluate(self, model, reference: list[list[int]] | None = None,
                 prompt_fn: PromptFn | None = None) -> HarnessResult:
        """Score ``model``. ``prompt_fn(question, prefix)`` changes how prompts are built (in-context
        notes, retrieval); ``reference`` (from :meth:`reference` on the foundation model) enables locality."""
        probes = self.probes
        res = score_targets(model, self.tok, self._prompts(prompt_fn, probes), [p["target"] for p in probes],
                            self.batch_size)
        # probability comparison where a true target is known (ROME's efficacy / paraphrase score)
        cmp_idx = [i for i, p in enumerate(probes) if p.get("target_true") and p["kind"] in ("reliability", "rephrase")]
        true_scores = score_targets(model, self.tok, self._prompts(prompt_fn, [probes[i] for i in cmp_idx]),
                                    [probes[i]["target_true"] for i in cmp_idx], self.batch_size) if cmp_idx else []
        beats = {i: float(res[i]["logprob"] > t["logprob"]) for i, t in zip(cmp_idx, true_scores)}
        rows = []
        loc_i = 0
        for i, (p, r) in enumerate(zip(probes, res)):
            row = dict(edit=p["edit"], kind=p["kind"], question=p["question"], target=p["target"],
                       acc=round(r["acc"], 3), logprob=round(r["logprob"], 3))
            if i in beats:
                row["new_beats_true"] = beats[i]
            if p["kind"] == "locality":
                if reference is not None:
                    ref = reference[loc_i]
                    same = sum(int(a == b) for a, b in zip(ref, r["pred"])) / max(len(ref), 1)
                    row["unchanged"] = round(same, 3)
                loc_i += 1
            rows.append(row)

        def mean(xs):
            xs = list(xs)
            return sum(xs) / len(xs) if xs else float("nan")

        summary = {}
        for k in ("reliability",) + GENERALITY:
            summary[k] = mean(r["acc"] for r in rows if r["kind"] == k)
        summary["generality"] = mean(r["acc"] for r in rows if r["kind"] in GENERALITY)
        # strict version: the whole target right (every token is the argmax)
        summary["reliability_exact"] = mean(float(r["acc"] == 1.0) for r in rows if r["kind"] == "reliability")
        summary["locality_acc"] = mean(r["acc"] for r in rows if r["kind"] == "locality")
        if reference is not None:
            summary["locality"] = mean(r["unchanged"] for r in rows if r["kind"] == "locality")
        if beats:
            summary["efficacy"] = mean(v for i, v in beats.items() if probes[i]["kind"] == "reliability")
        return HarnessResult(summary=summary, rows=rows)


# ---------------------------------------------------------------- forgetting measurements

def answer_length(texts: Sequence[str]) -> float:
    """Mean answer length in words."""
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def parse_json(text: str):
    """The first JSON object in ``text`` (code fences allowed), or None."""
    t = text.strip()
    m = re.search(r"```(?:json)?\s*(.*?)```", t, re.S)
    if m:
        t = m.group(1).strip()
    start = t.find("{")
    if start < 0:
        return None
    depth = 0
    for j in range(start, len(t)):
        if t[j] == "{":
            depth += 1
        elif t[j] == "}":
            depth -= 1
            if depth == 0:
                try:
                    obj = json.loads(t[start : j + 1])
                    return obj if isinstance(obj, dict) else None
                except json.JSONDecodeError:
                    return None
    return None


def json_rate(texts: Sequence[str], key: str | None = None) -> float:
    """Fraction of texts that contain a parseable JSON object (with ``key`` if given)."""
    ok = 0
    for t in texts:
        obj = parse_json(t)
        ok += int(obj is not None and (key is None or key in obj))
    return ok / max(len(texts), 1)


def mention_rate(texts: Sequence[str], needle: str) -> float:
    """Fraction of texts that mention ``needle`` (case-insensitive)."""
    n = needle.lower()
    return sum(n in t.lower() for t in texts) / max(len(texts), 1)
