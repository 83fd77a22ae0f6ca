"""Replay against forgetting, with and without the original data (notebook 03).

Every function here makes one kind of replay data, so students can reuse it on their own task:

* **experience replay** — mix a share of old-stage data into the new task (:func:`mix`);
* **pseudo experience replay** — questions written by people, answered by the model itself
  (:func:`pseudo_replay`);
* **Magpie** — the model writes its own user turns from the bare chat template (with the template's
  default system prompt, or from the bare ``<|im_start|>user`` prefix: :func:`magpie_prefix`), sampled
  with a fixed seed, then answers them greedily (:func:`magpie_questions`, :func:`magpie`);
* **Self-Synthesized Rehearsal (SSR)** — few-shot generated questions, re-answered by the current
  model, a diverse subset chosen by K-means (:func:`ssr_questions`, :func:`embed`, :func:`kmeans_subset`);
* **self-output targets** — train the new task on the model's own answer when it is right
  (:func:`self_output_examples`);
* **paraphrase targets** — the model rewrites the gold answer in its own words (it is shown the gold
  answer); a rewrite that names the gold label becomes the target (:func:`paraphrase_examples`);
* **safety replay** — a small safety stage teaches refusals (:func:`load_safety`, :func:`safety_stage`),
  then a share of its refusal examples is mixed into post-training (:func:`safety_examples` + :func:`mix`);
  refusals are read from short greedy answers (:func:`is_refusal`, :func:`refusal_rate`);
* **selective token masking** — per-token perplexity of the gold answer under the foundation model;
  tokens above a threshold (2.5 in the paper) are left out of the loss (:func:`token_ppl`,
  :func:`mask_by_ppl`; ``coursekit.finetune`` reads the per-completion-token ``"mask"``).

Generated data is cached as JSON in the course cache under a hash of everything that decides it
(:func:`cached`, :mod:`coursekit.cache`), and regenerated deterministically (fixed seed, greedy answers)
when missing.

Learning is measured format-free (:func:`task_accuracy_generated`: the first emotion word in a short
greedy answer is the gold one), so a model trained on its own wordier answers is not penalised.

Data files (validated on load, one-line :class:`CourseError` naming file and field):

``data/replay_questions.json`` — an object with
    ``questions`` (list[str], >= 4 human-written everyday questions, none in the probe/task sets) and
    ``ssr_prefix`` (str, the text that starts the few-shot SSR prompt).
``data/safety.json`` — an object with
    ``refusal`` (str, the refusal the safety stage teaches), ``harmful_train`` and ``harmful_eval``
    (list[str], requests to refuse; disjoint), ``benign_train`` and ``benign_eval`` (list[str], requests to
    answer; the model's own answers to ``benign_train`` are trained on so that it stays helpful).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from .chat import chat_prompt, generate
from .errors import CourseError

REPLAY_FILE = "replay_questions.json"
SAFETY_FILE = "safety.json"
PLACEHOLDER = "\uE000QUESTION\uE000"


# ------------------------------------------------------------------ data file

def load_replay_questions(name: str = REPLAY_FILE) -> dict:
    """``data/replay_questions.json`` (schema in the module docstring), validated."""
    from .data import field_fail, field_strings, load_json

    d = load_json(name)
    qs = field_strings(name, d if isinstance(d, dict) else {}, "questions", min_len=4)
    if len(set(qs)) != len(qs):
        field_fail(name, "questions", "has duplicates")
    if not isinstance(d.get("ssr_prefix"), str):
        field_fail(name, "ssr_prefix", "must be a string")
    return d


# ------------------------------------------------------------------ cache

def cached(name: str, parts, fn: Callable[[], list | dict], weights=None):
    """Generated data (JSON) from the course cache (:mod:`coursekit.cache`), or ``fn()`` stored there,
    keyed by ``parts`` (everything that decides the set), the source of this module, of ``fn`` and of the
    generation and training code it may call, the library versions and ``weights`` (the model that generates
    it: full fingerprint)."""
    from . import cache, evaluate, finetune

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise CourseError(f"cached(): name must be a plain file name (got {name!r})")
    return cache.json(f"replay/{name}", list(parts), fn, code=[cached, fn, generate, finetune, evaluate], weights=weights)


# ------------------------------------------------------------------ experience replay: mixing

def mix(task: Sequence[dict], replay: Sequence[dict], ratio: float, seed: int = 0) -> list[dict]:
    """The training pool for experience replay: all ``task`` examples plus ``k`` replay examples so that
    replay is a share ``ratio`` of the pool (``k = round(ratio * len(task) / (1 - ratio))``), drawn
    without repetition from a seeded shuffle of ``replay`` (cycling if more are needed). ``train()`` walks
    the pool in shuffled epochs, so about ``ratio`` of every batch is replay — at the same budget (steps
    x batch size) as plain fine-tuning."""
    import random

    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or not 0 <= ratio < 1:
        raise CourseError(f"mix(): ratio must be a number in [0, 1) (got {ratio!r})")
    if not task:
        raise CourseError("mix(): the task set is empty")
    k = round(ratio * len(task) / (1 - ratio))
    if k and not replay:
        raise CourseError(f"mix(): ratio {ratio} needs replay examples but none were given")
    order = list(range(len(replay)))
    random.Random(seed).shuffle(order)
    return list(task) + [replay[order[i % len(order)]] for i in range(k)]


def as_examples(tok, pairs: Sequence[dict], suffix: str = "") -> list[dict]:
    """``{"question", "answer"}`` pairs -> ``sft_example`` dicts (``suffix`` appended to each question)."""
    from .finetune import sft_example

    out = []
    for j, p in enumerate(pairs):
        if not isinstance(p, dict) or not isinstance(p.get("question"), str) or not isinstance(p.get("answer"), str):
            raise CourseError(f"as_examples(): pair {j} must be a dict with string 'question' and 'answer'")
        out.append(sft_example(tok, (p["question"] + (" " + suffix if suffix else "")).strip(), p["answer"]))
    return out


# ------------------------------------------------------------------ pseudo experience replay

def pseudo_replay(model, tok, questions: Sequence[str], max_new_tokens: int = 24, suffix: str = "") -> list[dict]:
    """Human-written questions (``suffix`` appended, e.g. a format instruction), answered greedily by
    ``model`` itself: the replay set's targets are the model's own words."""
    qs = [q for q in questions if isinstance(q, str) and q.strip()]
    if not qs or len(qs) != len(questions):
        raise CourseError("pseudo_replay(): questions must be a non-empty list of non-empty strings")
    full = [(q + (" " + suffix if suffix else "")).strip() for q in qs]
    outs = generate(model, tok, [chat_prompt(tok, q) for q in full], max_new_tokens)
    return [{"question": q, "answer": a} for q, a in zip(qs, outs)]


# ------------------------------------------------------------------ Magpie

def magpie_prefix(tok, system: str = "default") -> str:
    """The text that opens a user turn. ``system="default"``: everything the chat template writes before
    the user's words (SmolLM2 inserts its default system prompt); ``system="bare"``: only the user-turn
    header; any other string: that system prompt."""
    if system == "bare":
        full = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False)
        head = full[: full.index(PLACEHOLDER)]
        # keep only the last turn header (drop any system block the template added)
        start = head.rfind("<|im_start|>")
        return head[start:] if start >= 0 else head
    if not isinstance(system, str):
        raise CourseError(f"magpie_prefix(): system must be 'default', 'bare' or a string (got {system!r})")
    msgs = ([] if system == "default" else [{"role": "system", "content": system}]) + [
        {"role": "user", "content": PLACEHOLDER}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    return full[: full.index(PLACEHOLDER)]


def sample(model, tok, prompt: str, n: int, max_new_tokens: int = 24, seed: int = 0,
           temperature: float = 1.0, stop: str | None = None) -> list[str]:
    """``n`` sampled continuations of one prompt (``torch.manual_seed(seed)``, ``do_sample=True``), cut at
    the end-of-turn token and at ``stop``."""
    import torch

    if not isinstance(n, int) or n < 1:
        raise CourseError(f"sample(): n must be a positive integer (got {n!r})")
    dev = next(model.parameters()).device
    enc = tok([prompt] * n, return_tensors="pt", add_special_tokens=False).to(dev)
    torch.manual_seed(seed)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=None, top_k=None,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    outs = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if stop:
        outs = [o.split(stop)[0] for o in outs]
    return [o.strip() for o in outs]


def magpie_questions(model, tok, n: int, system: str = "default", max_new_tokens: int = 24, seed: int = 0) -> list[str]:
    """Magpie's step 1: let the model write the user's turn from :func:`magpie_prefix` (sampled)."""
    return sample(model, tok, magpie_prefix(tok, system), n, max_new_tokens, seed)


def magpie(model, tok, n: int, system: str = "default", q_tokens: int = 24, a_tokens: int = 24, seed: int = 0,
           suffix: str = "") -> list[dict]:
    """Magpie: sampled questions (:func:`magpie_questions`), then greedy answers by the same model
    (``suffix`` appended to each question before answering). Empty questions are dropped."""
    qs = [q for q in magpie_questions(model, tok, n, system, q_tokens, seed) if q]
    if not qs:
        raise CourseError("magpie(): the model wrote no non-empty question")
    return pseudo_replay(model, tok, qs, a_tokens, suffix)


# ------------------------------------------------------------------ Self-Synthesized Rehearsal

def ssr_prompt(seed_questions: Sequence[str], prefix: str = "", shots: int = 3, offset: int = 0) -> str:
    """A few-shot prompt (plain text) that lists ``shots`` example questions and leaves the next open."""
    if not seed_questions or shots < 1:
        raise CourseError("ssr_prompt(): need at least one seed question and shots >= 1")
    picks = [seed_questions[(offset + i) % len(seed_questions)] for i in range(shots)]
    return prefix + "".join(f"Question: {q}\n" for q in picks) + "Question:"


def ssr_questions(model, tok, seed_questions: Sequence[str], n: int, prefix: str = "", shots: int = 3,
                  max_new_tokens: int = 20, seed: int = 0) -> list[str]:
    """SSR step 1: ``n`` new questions, each sampled after a different few-shot window of the seeds;
    questions identical to a seed or to each other are dropped."""
    outs = []
    for i in range(n):
        q = sample(model, tok, ssr_prompt(seed_questions, prefix, shots, offset=i * shots), 1,
                   max_new_tokens, seed + i, stop="\n")[0]
        if q and q not in seed_questions and q not in outs:
            outs.append(q)
    return outs


def embed(model, tok, texts: Sequence[str]) -> "numpy.ndarray":
    """Mean-pooled last hidden state of each text under ``model`` (one row per text)."""
    import numpy as np
    import torch

    dev = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False).to(dev)
            h = model(**ids, output_hidden_states=True).hidden_states[-1][0]
            rows.append(h.float().mean(0).cpu().numpy())
    return np.stack(rows)


def kmeans_subset(X, k: int, seed: int = 0) -> list[int]:
    """Indices (sorted) of the ``k`` rows nearest to the centres of a seeded K-means clustering — a
    diverse subset. Deterministic for a fixed ``seed``."""
    import numpy as np
    from sklearn.cluster import KMeans

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not isinstance(k, int) or not 1 <= k <= len(X):
        raise CourseError(f"kmeans_subset(): need a 2-D array and 1 <= k <= rows (got shape {X.shape}, k={k!r})")
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(X)
    chosen = []
    for c in range(k):
        members = np.where(km.labels_ == c)[0]
        d = ((X[members] - km.cluster_centers_[c]) ** 2).sum(1)
        chosen.append(int(members[int(np.argmin(d))]))
    return sorted(chosen)


# ------------------------------------------------------------------ self-output targets

def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label word that appears first in ``text`` (case-insensitive, whole words), or None."""
    best, pos = None, None
    for lab in labels:
        m = re.search(r"\b" + re.escape(lab.lower()) + r"\b", text.lower())
        if m and (pos is None or m.start() < pos):
            best, pos = lab, m.start()
    return best


def _checked_targets(tok, questions, gold, outs, labels) -> tuple[list[dict], list[dict]]:
    """The model's text ``o`` becomes the target where it names the gold label first; otherwise ``"<gold>."``."""
    from .finetune import sft_example

    ex, rows = [], []
    for q, g, o in zip(questions, gold, outs):
        own = bool(o) and first_label(o, labels) == g
        target = o if own else g + "."
        ex.append(sft_example(tok, q, target))
        rows.append({"question": q, "gold": g, "model": o, "own": own, "target": target})
    return ex, rows


def _check_gold(fn: str, questions, gold) -> None:
    if not questions or len(questions) != len(gold):
        raise CourseError(f"{fn}(): {len(questions)} questions but {len(gold)} gold labels")


def self_output_examples(model, tok, questions: Sequence[str], gold: Sequence[str], labels: Sequence[str],
                         max_new_tokens: int = 16) -> tuple[list[dict], list[dict]]:
    """Self-output targets: the model answers each task question greedily; where its answer names the gold
    label first, that answer (its own words) becomes the target, otherwise the gold answer ``"<label>."``
    is kept. Returns ``(examples, rows)``; rows say which target was used (``"own"``)."""
    _check_gold("self_output_examples", questions, gold)
    outs = generate(model, tok, [chat_prompt(tok, q) for q in questions], max_new_tokens)
    return _checked_targets(tok, questions, gold, outs, labels)


PARAPHRASE_TEMPLATE = "Question: {question}\nCorrect answer: {answer}.\nRewrite the correct answer as a short full sentence."


def paraphrase_examples(model, tok, questions: Sequence[str], gold: Sequence[str], labels: Sequence[str],
                        template: str = PARAPHRASE_TEMPLATE, max_new_tokens: int = 24) -> tuple[list[dict], list[dict]]:
    """Paraphrase targets ("I learn better if you speak my language"; SDFT): the model is shown the question
    *and* the gold answer (``template`` with ``{question}`` and ``{answer}``) and rewrites the answer in its
    own words; a rewrite that names the gold label first becomes the target (the training prompt is the
    plain question), otherwise ``"<label>."`` is kept. Returns ``(examples, rows)`` as
    :func:`self_output_examples`."""
    _check_gold("paraphrase_examples", questions, gold)
    if not isinstance(template, str) or "{question}" not in template or "{answer}" not in template:
        raise CourseError("paraphrase_examples(): template must be a string with {question} and {answer}")
    prompts = [chat_prompt(tok, template.format(question=q, answer=g)) for q, g in zip(questions, gold)]
    return _checked_targets(tok, questions, gold, generate(model, tok, prompts, max_new_tokens), labels)


# ------------------------------------------------------------------ selective token masking

def token_ppl(model, tok, examples: Sequence[dict]) -> list[list[tuple[str, float]]]:
    """Per completion-token perplexity ``exp(-log p(token | everything before))`` under ``model``, one list
    of ``(token text, perplexity)`` per example, in the tokenisation ``finetune`` trains on."""
    import torch

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for j, ex in enumerate(examples):
            if not isinstance(ex, dict) or not ex.get("prompt") or not ex.get("completion"):
                raise CourseError(f"token_ppl(): example {j} needs a non-empty 'prompt' and 'completion'")
            p = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(ex["completion"], add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c], device=dev)).logits[0].float(), -1)
            out.append([(tok.decode([t]), math.exp(-logp[len(p) - 1 + k, t].item())) for k, t in enumerate(c)])
    return out


def mask_by_ppl(examples: Sequence[dict], ppl: Sequence[Sequence[tuple[str, float]]],
                threshold: float = 2.5) -> tuple[list[dict], float]:
    """Selective token masking: each example gets ``"mask"`` (1 = keep in the loss) with the tokens whose
    perplexity is above ``threshold`` masked out. Examples with every token masked carry no loss and are
    dropped. Returns ``(examples, masked fraction of all completion tokens)``."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
        raise CourseError(f"mask_by_ppl(): threshold must be a positive number (got {threshold!r})")
    if len(examples) != len(ppl):
        raise CourseError(f"mask_by_ppl(): {len(examples)} examples but {len(ppl)} perplexity lists")
    out, total, masked = [], 0, 0
    for ex, row in zip(examples, ppl):
        m = [int(v <= threshold) for _, v in row]
        total += len(m)
        masked += len(m) - sum(m)
        if sum(m):
            out.append(dict(ex, mask=m))
    if not out:
        raise CourseError(f"mask_by_ppl(): every token is above the threshold {threshold}; nothing left to train on")
    return out, masked / max(total, 1)


def show_mask(row: Sequence[tuple[str, float]], threshold: float = 2.5) -> str:
    """One example's completion with masked tokens in ``[brackets]`` and each perplexity."""
    return " ".join((f"[{t!r}:{v:.1f}]" if v > threshold else f"{t!r}:{v:.1f}") for t, v in row)


# ------------------------------------------------------------------ measuring learning

def task_accuracy_generated(model, tok, skills: dict, split: str = "task_eval", max_new_tokens: int = 8,
                            suffix: str = "") -> tuple[float, list[str]]:
    """Format-free task accuracy: a short greedy answer is right when the first emotion word in it is the
    gold label (``"happy."``, ``"The speaker is happy."`` and ``{"answer": "happy"}`` all count)."""
    from .forgetting import task_question

    rows = skills[split]
    qs = [(task_question(skills, r["text"]) + (" " + suffix if suffix else "")).strip() for r in rows]
    outs = generate(model, tok, [chat_prompt(tok, q) for q in qs], max_new_tokens)
    right = sum(first_label(o, skills["emotions"]) == r["label"] for o, r in zip(outs, rows))
    return right / len(rows), outs


# ------------------------------------------------------------------ safety replay

REFUSAL_RE = re.compile(r"\b(?:can'?t|can’t|cannot|unable to|won'?t|will not) (?:help|assist)", re.I)


def load_safety(name: str = SAFETY_FILE) -> dict:
    """``data/safety.json`` (schema in the module docstring), validated."""
    from .data import _rel, data_path, field_fail, field_strings, load_json

    d = load_json(name)
    if not isinstance(d, dict):
        raise CourseError(f"{_rel(data_path(str(name)))}: must be a JSON object")
    if not isinstance(d.get("refusal"), str) or not is_refusal(d["refusal"]):
        field_fail(name, "refusal", "must be a string that is_refusal() recognises "
                                    "(e.g. \"I'm sorry, but I can't help with that.\")")
    for f in ("harmful_train", "harmful_eval", "benign_train", "benign_eval"):
        if len(set(field_strings(name, d, f, min_len=2))) != len(d[f]):
            field_fail(name, f, "has duplicates")
    seen = set(d["harmful_train"]) | set(d["benign_train"])
    for f in ("harmful_eval", "benign_eval"):
        both = seen & set(d[f])
        if both:
            field_fail(name, f, f"repeats a training request: {sorted(both)[0]!r}")
    return d


def is_refusal(text: str) -> bool:
    """Does a (short) answer refuse? ("... can't help", "cannot assist", "unable to help", ...)."""
    return bool(REFUSAL_RE.search(text or ""))


def refusal_rate(model, tok, prompts: Sequence[str], max_new_tokens: int = 12) -> tuple[float, list[str]]:
    """Share of ``prompts`` whose short greedy answer is a refusal, and the answers."""
    if not prompts:
        raise CourseError("refusal_rate(): no prompts")
    outs = generate(model, tok, [chat_prompt(tok, q) for q in prompts], max_new_tokens)
    return sum(map(is_refusal, outs)) / len(outs), outs


def safety_examples(tok, safety: dict, split: str = "harmful_train") -> list[dict]:
    """The safety data: each harmful request -> the refusal (``sft_example`` dicts)."""
    from .finetune import sft_example

    return [sft_example(tok, q, safety["refusal"]) for q in safety[split]]


def safety_stage(model, tok, safety: dict, steps: int = 40, lr: float = 1e-3, r: int = 8, batch_size: int = 4,
                 max_new_tokens: int = 48, cache: bool = True, progress: bool | str = "safety stage"):
    """A small safety-alignment stage: LoRA (merged, cached by ``forgetting.lora_stage``) on the refusals of
    ``harmful_train`` plus the model's *own* greedy answers to ``benign_train`` (so it does not learn to
    refuse everything). Returns ``(model, history, benign_pairs)``."""
    from .forgetting import lora_stage

    benign = cached("safety-benign", [safety["benign_train"], max_new_tokens],
                    lambda: pseudo_replay(model, tok, safety["benign_train"], max_new_tokens), weights=model)
    examples = safety_examples(tok, safety) + as_examples(tok, benign)
    model, history = lora_stage(model, tok, examples, "safety",
                                [safety["refusal"], safety["harmful_train"], benign],
                                steps, lr, r, batch_size, cache, progress)
    return model, history, benign
