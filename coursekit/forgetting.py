"""Fine-tuning with gradient descent and catastrophic forgetting (notebook 01; reused by 02/03).

What lives here (the training loop itself is :func:`coursekit.finetune.train`):

* the three data styles the lecture names for one piece of knowledge — pre-training text, SFT
  question/answer, DPO preference pair (:func:`three_styles`) — and a hand-written DPO loss
  (:func:`dpo_loss`, :func:`sequence_logprob`);
* per-token losses l1..lN of an answer (:func:`token_losses`), to see why the "Who is ... -> the name"
  shortcut has the same loss as the right logic;
* notebook 01 I's measurements, one value per item so that seeds x items give intervals
  (:class:`FamilyProbe`: the new name in short greedy answers to held-out probe families, teacher-forced
  reliability and locality against the foundation model's own answers via
  :class:`coursekit.abilities.OldAbilities`, answer length and natural endings on open questions —
  :func:`open_answers`), and one attempt over seeds, cached (:func:`attempts`); defensive targets in the
  model's own words that are never cut mid-sentence (:func:`own_examples`);
* an ability to build and then forget — answering in JSON when asked — its "alignment stage"
  (:func:`alignment_examples`, :func:`alignment_stage`), a narrow post-training task (emotion of a
  sentence, :func:`task_examples`), and notebook 01 II's per-epoch measurements of both
  (:class:`FormatProbe`, :func:`narrow_curve`, :func:`json_curve_record`; :func:`json_ability` is notebook 03's quick rate).

Data files (validated on load, one-line :class:`CourseError` naming file and field):

``data/forgetting_probes.json`` — an object with
    ``new_name`` (str, the name the fine-tune teaches), ``who_heldout`` (list[str], who-questions never
    trained on), ``non_who`` (list[str]), ``open`` (list[str], open questions whose answer length is
    measured), ``one_defensive`` ({question, answer}), ``uk_probe`` (str), ``nerdy_probe`` (str),
    ``defensive`` (list of {question, answer}: short human-written answers).
``data/forgetting_families.json`` — notebook 01's training examples and held-out probe families, an object with
    ``new_name`` (str), ``edit`` ({questions: list[str] (≥ 3 phrasings; seed ``s`` trains on phrasing ``s``,
    the others measure generality), answer}), ``one_defensive`` ({question, answer}), ``defensive`` (list of
    {question, answer}), ``leak`` (str: the defensive answer's tell-tale word), the probe families
    ``who`` (≥ 30), ``non_who`` (≥ 30), ``heads`` (≥ 10 neighbours of the defensive question),
    ``superlatives`` (≥ 10 "Who is the ⟨X⟩-est person …?"), ``open`` (≥ 30 open questions), ``json_heldout``
    (≥ 30 questions outside the narrow task's template) and ``emotion_heldout`` (list of {text, label}). No
    probe question is a training question (checked on load).
``data/forgetting_skills.json`` — an object with
    ``json_instruction`` (str appended to a question), ``json_key`` (str), ``align`` (list of
    {question, answer}: the alignment stage, answers become ``{"<json_key>": "<answer>"}``),
    ``emotions`` (list[str]), ``task_question`` (str with ``{text}``), ``task_train`` and
    ``task_eval`` (lists of {text, label}, label one of ``emotions``).
"""
from __future__ import annotations

import json
import math
from typing import Sequence

from .abilities import OldAbilities
from .chat import chat_prompt, generate, generate_ids
from .data import field_fail, field_pairs, field_string, field_strings, load_json
from .errors import CourseError
from .evaluate import json_rate
from .finetune import pretrain_example, sft_example

PROBES_FILE = "forgetting_probes.json"
SKILLS_FILE = "forgetting_skills.json"
FAMILIES_FILE = "forgetting_families.json"
# the probe families of notebook 01 and their minimum sizes (the evidence standard: >= 30 items per family;
# >= 10 for the two small families the lecture names: neighbours of the defensive question, near probes)
FAMILY_SIZES = {"who": 30, "non_who": 30, "heads": 10, "superlatives": 10, "open": 30, "json_heldout": 30}
NAMED = ("who", "non_who", "heads", "superlatives")  # families whose short answers may say the new name


# ------------------------------------------------------------------ data files

def load_probes(name: str = PROBES_FILE) -> dict:
    """The probe/defensive-question file (schema in the module docstring), validated."""
    d = load_json(name)
    field_string(name, d, "new_name")
    for f in ("who_heldout", "non_who", "open"):
        field_strings(name, d, f)
    for f in ("uk_probe", "nerdy_probe"):
        field_string(name, d, f)
    field_pairs(name, {"one_defensive": [d.get("one_defensive")]}, "one_defensive")
    field_pairs(name, d, "defensive", min_len=2)
    return d


def load_skills(name: str = SKILLS_FILE) -> dict:
    """The ability/narrow-task file (schema in the module docstring), validated."""
    d = load_json(name)
    field_string(name, d, "json_instruction")
    field_string(name, d, "json_key")
    field_pairs(name, d, "align")
    emotions = field_strings(name, d, "emotions", min_len=2)
    if "{text}" not in field_string(name, d, "task_question"):
        field_fail(name, "task_question", "must contain the placeholder {text}")
    for f in ("task_train", "task_eval"):
        for j, r in enumerate(field_pairs(name, d, f, keys=("text", "label"))):
            if r["label"] not in emotions:
                field_fail(name, f"{f}[{j}].label", f"must be one of {emotions} (got {r['label']!r})")
    return d


def training_questions(fam: dict) -> list[str]:
    """Every question notebook 01 trains on (all phrasings of the edit, the defensive questions)."""
    return [*fam["edit"]["questions"], fam["one_defensive"]["question"], *(d["question"] for d in fam["defensive"])]


def probe_questions(fam: dict) -> list[str]:
    """Every held-out probe question of notebook 01 (the families of :data:`FAMILY_SIZES`)."""
    return [q for f in FAMILY_SIZES for q in fam[f]]


def load_families(name: str = FAMILIES_FILE) -> dict:
    """Notebook 01's training examples and probe families (schema in the module docstring), validated:
    family sizes, and no probe question among the training questions."""
    d = load_json(name)
    for f in ("new_name", "leak"):
        field_string(name, d, f)
    edit = d.get("edit")
    if not isinstance(edit, dict):
        field_fail(name, "edit", "must be an object with 'questions' (>= 3 phrasings) and 'answer'")
    field_strings(name, edit, "questions", min_len=3)
    field_string(name, edit, "answer")
    field_pairs(name, {"one_defensive": [d.get("one_defensive")]}, "one_defensive")
    field_pairs(name, d, "defensive", min_len=2)
    for f, n in FAMILY_SIZES.items():
        field_strings(name, d, f, min_len=n)
    field_pairs(name, d, "emotion_heldout", keys=("text", "label"))
    both = sorted(set(probe_questions(d)) & set(training_questions(d)))
    if both:
        field_fail(name, "probe families", f"contain training questions (held-out probes must not): {both[:3]}")
    return d


# ------------------------------------------------------------------ the three data styles + DPO

def three_styles(tok, question: str, answer: str, wrong_answer: str, statement: str) -> dict:
    """One piece of knowledge written as the lecture's three kinds of training data.

    ``pretrain``: plain text, loss on every token. ``sft``: chat prompt -> answer, loss on the answer.
    ``dpo``: the same prompt with a chosen and a rejected answer (a preference pair).
    """
    for k, v in dict(question=question, answer=answer, wrong_answer=wrong_answer, statement=statement).items():
        if not isinstance(v, str) or not v.strip():
            raise CourseError(f"three_styles(): '{k}' must be a non-empty string")
    prompt = chat_prompt(tok, question)
    return {
        "pretrain": pretrain_example(tok, statement),
        "sft": sft_example(tok, question, answer),
        "dpo": {"prompt": prompt, "chosen": answer + tok.eos_token, "rejected": wrong_answer + tok.eos_token},
    }


def sequence_logprob(model, tok, prompt: str, completion: str) -> "torch.Tensor":
    """log P(completion | prompt) summed over the completion tokens (differentiable)."""
    import torch

    p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tok(completion, add_special_tokens=False)["input_ids"]
    if not c:
        raise CourseError(f"sequence_logprob(): completion {completion!r} has no tokens")
    if not p:
        raise CourseError("sequence_logprob(): the prompt must not be empty (the first token has no context)")
    dev = next(model.parameters()).device
    ids = torch.tensor([p + c], device=dev)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=dev)
    return logp[pos, torch.tensor(c, device=dev)].sum()


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """The DPO loss, written out: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.

    Arguments are summed log-probabilities (floats or tensors) of the chosen / rejected answers
    under the model being trained (pi) and the frozen reference model. With pi == ref it is log 2.
    """
    import torch
    import torch.nn.functional as F

    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise CourseError(f"dpo_loss(): beta must be a positive number (got {beta!r})")
    t = [x if isinstance(x, torch.Tensor) else torch.tensor(float(x)) for x in
         (pi_chosen, pi_rejected, ref_chosen, ref_rejected)]
    margin = (t[0] - t[2]) - (t[1] - t[3])
    return -F.logsigmoid(beta * margin)


def token_losses(model, tok, prompt: str, completion: str) -> list[tuple[str, float]]:
    """The lecture's l1, l2, ...: cross-entropy of each completion token given everything before it."""
    import torch

    c = tok(completion, add_special_tokens=False)["input_ids"]
    if not c:
        raise CourseError(f"token_losses(): completion {completion!r} has no tokens")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    dev = next(model.parameters()).device
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c], device=dev)).logits[0].float(), -1)
    out = []
    for k, t in enumerate(c):
        out.append((tok.decode([t]), -logp[len(p) - 1 + k, t].item()))
    return out


# ------------------------------------------------------------------ forgetting measurements

def answers(model, tok, questions: Sequence[str], max_new_tokens: int = 12, system: str | None = None,
            batch_size: int = 32) -> list[str]:
    """Short greedy answers (batched) — what a student reads."""
    return generate(model, tok, [chat_prompt(tok, q, system) for q in questions], max_new_tokens, batch_size)


# ------------------------------------------------------------------ an ability to build and forget

def json_question(skills: dict, question: str) -> str:
    return f"{question} {skills['json_instruction']}"


def alignment_examples(tok, skills: dict) -> list[dict]:
    """The alignment stage: questions + the JSON instruction -> ``{"answer": "..."}``."""
    key = skills["json_key"]
    return [sft_example(tok, json_question(skills, a["question"]), json.dumps({key: a["answer"]}))
            for a in skills["align"]]


def task_question(skills: dict, text: str) -> str:
    return skills["task_question"].format(text=text)


def task_examples(tok, skills: dict, split: str = "task_train") -> list[dict]:
    """The narrow post-training task: emotion question (no JSON asked) -> one word, e.g. ``"happy."``."""
    return [sft_example(tok, task_question(skills, r["text"]), r["label"] + ".") for r in skills[split]]


def json_ability(model, tok, skills: dict, split: str = "task_eval", max_new_tokens: int = 16) -> tuple[float, list[str]]:
    """Fraction of emotion questions *with* the JSON instruction whose answer parses as JSON with the key."""
    qs = [json_question(skills, task_question(skills, r["text"])) for r in skills[split]]
    outs = answers(model, tok, qs, max_new_tokens)
    return json_rate(outs, skills["json_key"]), outs


# ------------------------------------------------------------------ probe families, one value per item

def _words_and_ends(tok, ids: Sequence[list[int]]) -> tuple[list[float], list[float]]:
    """Per answer: its length in words, and 1.0 when it ended by itself (end-of-turn before the cap)."""
    text = tok.batch_decode(ids, skip_special_tokens=True)
    return [float(len(t.split())) for t in text], [float(tok.eos_token_id in a) for a in ids]


def open_answers(model, tok, questions: Sequence[str], max_new_tokens: int = 48) -> dict:
    """Greedy answers to open questions: ``{"words": [...], "ended": [...], "text": [...]}`` per question
    (``ended`` = 1.0 when the answer stopped by itself before ``max_new_tokens``)."""
    ids = generate_ids(model, tok, [chat_prompt(tok, q) for q in questions], max_new_tokens)
    words, ended = _words_and_ends(tok, ids)
    return {"words": words, "ended": ended,
            "text": [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]}


def own_examples(model, tok, questions: Sequence[str], max_new_tokens: int = 64) -> tuple[list[dict], list[bool]]:
    """SFT examples whose targets are ``model``'s own greedy answers. An answer that ended by itself keeps
    its end-of-turn token; one cut at ``max_new_tokens`` gets none, so training never teaches the model to
    stop mid-sentence (the loss simply does not see how it would have ended). Returns the examples and,
    per answer, whether it ended by itself."""
    ids = generate_ids(model, tok, [chat_prompt(tok, q) for q in questions], max_new_tokens)
    ended = [tok.eos_token_id in a for a in ids]
    text = tok.batch_decode(ids, skip_special_tokens=True)
    return [{"prompt": chat_prompt(tok, q), "completion": t.strip() + (tok.eos_token if e else "")}
            for q, t, e in zip(questions, text, ended)], ended


class FamilyProbe:
    """What notebook 01 measures after each attempt, one value per item (seeds x items -> intervals).

    ``probe = FamilyProbe(foundation, tok, fam)`` keeps the foundation model's references;
    ``probe.measure(model, trained, families)`` returns ``{"values": {measure: [per item]}, "answers":
    {question: short answer}, "why": {...}}``. Measures: ``reliability`` / ``generality`` (teacher-forced
    token accuracy of the edit's answer on the trained phrasing / the other phrasings), ``defended`` (the same
    for the one defensive example's answer), ``<family>_names`` for each family asked (of :data:`NAMED`: 1.0
    when the short greedy answer says the new name), for ``heads`` also ``heads_leak`` (says the defensive
    answer's word) and ``heads_broken`` (either), ``who_logp_rise`` (per-token log-probability of the new answer
    after a who-question, minus the foundation's), ``who_forget`` (NLL rise of the foundation's own answers to
    the who-questions) and, with ``with_open=True``, ``open_words`` / ``open_ended`` (:func:`open_answers`).
    Prompt tokens are what a measurement costs on a CPU, so each attempt asks only the families its claim needs."""

    def __init__(self, foundation, tok, fam: dict, max_new_tokens: int = 10, open_tokens: int = 48):
        from . import cache

        self.tok, self.fam = tok, fam
        self.max_new_tokens, self.open_tokens = max_new_tokens, open_tokens
        self.weights = cache.fingerprint(foundation)
        self.who = OldAbilities.build(foundation, tok, fam["who"], max_new_tokens=16, progress=False)
        self.base_logp = self._new_answer_logp(foundation)

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "open_tokens": self.open_tokens, "fam": self.fam}

    def _new_answer_logp(self, model) -> list[float]:
        from .evaluate import score_targets

        qs = self.fam["who"]
        sc = score_targets(model, self.tok, [chat_prompt(self.tok, q) for q in qs],
                           [self.fam["edit"]["answer"] + self.tok.eos_token] * len(qs))
        return [r["logprob"] / r["n"] for r in sc]

    def _accuracy(self, model, questions: Sequence[str], answer: str) -> list[float]:
        from .evaluate import score_targets

        sc = score_targets(model, self.tok, [chat_prompt(self.tok, q) for q in questions],
                           [answer + self.tok.eos_token] * len(questions))
        return [r["acc"] for r in sc]

    def measure(self, model, trained: str, families: Sequence[str] = NAMED, with_open: bool = False) -> dict:
        fam, tok = self.fam, self.tok
        edit, d1 = fam["edit"], fam["one_defensive"]
        unknown = sorted(set(families) - set(NAMED))
        if unknown:
            raise CourseError(f"FamilyProbe.measure(): unknown families {unknown} (known: {list(NAMED)})")
        qs = [q for f in families for q in fam[f]] + [*edit["questions"], d1["question"]]  # + the trained ones, to read
        said = dict(zip(qs, answers(model, tok, qs, self.max_new_tokens, batch_size=64)))
        v = {"reliability": self._accuracy(model, [trained], edit["answer"]),
             "generality": self._accuracy(model, [q for q in edit["questions"] if q != trained], edit["answer"]),
             "defended": self._accuracy(model, [d1["question"]], d1["answer"])}
        for f in families:
            v[f"{f}_names"] = [float(fam["new_name"].lower() in said[q].lower()) for q in fam[f]]
        if "heads" in families:
            v["heads_leak"] = [float(fam["leak"].lower() in said[q].lower()) for q in fam["heads"]]
            v["heads_broken"] = [max(a, b) for a, b in zip(v["heads_names"], v["heads_leak"])]
        v["who_logp_rise"] = [a - b for a, b in zip(self._new_answer_logp(model), self.base_logp)]
        v["who_forget"] = self.who.per_item(model, tok)["forgetting"]
        if with_open:
            o = open_answers(model, tok, fam["open"], self.open_tokens)
            v["open_words"], v["open_ended"] = o["words"], o["ended"]
            said.update(zip(fam["open"], o["text"]))
        why = {"trained": token_losses(model, tok, chat_prompt(tok, trained), edit["answer"] + tok.eos_token),
               "other": token_losses(model, tok, chat_prompt(tok, fam["who"][0]), edit["answer"] + tok.eos_token)}
        return {"values": v, "answers": said, "why": why}


# notebook 01's attempts: training set (attempt_examples), steps, batch size, the families each claim needs
LR = 3e-5  # full fine-tuning, AdamW, as in the lecture's demo
ATTEMPTS = {
    "one": dict(steps=15, batch_size=1, families=("who", "non_who"), with_open=False),              # C1
    "one_defensive": dict(steps=15, batch_size=2, families=("who", "heads"), with_open=False),       # C2
    "short_defensive": dict(steps=20, batch_size=4, families=("who",), with_open=True),             # C2
    "own": dict(steps=20, batch_size=4, families=("who", "superlatives"), with_open=True),          # C3
}


def attempt_examples(tok, fam: dict, kind: str, seed: int, own: Sequence[dict] | None = None) -> tuple[list[dict], str]:
    """The training set of attempt ``kind`` (:data:`ATTEMPTS`) for ``seed``, and the trained phrasing: seed ``s``
    trains on the edit's phrasing ``s``; ``one`` is that example alone, ``one_defensive`` adds the one defensive
    example, ``short_defensive`` repeats the edit 4x beside the 16 short human-written defensive answers, ``own``
    beside ``own`` (the foundation's own answers, :func:`own_examples`)."""
    qs = fam["edit"]["questions"]
    if kind not in ATTEMPTS:
        raise CourseError(f"unknown attempt {kind!r} (known: {list(ATTEMPTS)})")
    if not 0 <= seed < len(qs):
        raise CourseError(f"attempt seed {seed} has no phrasing: the edit has {len(qs)} (seeds 0..{len(qs) - 1})")
    if (kind == "own") != (own is not None):
        raise CourseError("pass own= (the foundation's own answers) for the 'own' attempt, and only for it")
    edit = sft_example(tok, qs[seed], fam["edit"]["answer"])
    d1 = fam["one_defensive"]
    rest = {"one": [], "one_defensive": [sft_example(tok, d1["question"], d1["answer"])],
            "short_defensive": [sft_example(tok, d["question"], d["answer"]) for d in fam["defensive"]],
            "own": list(own or [])}[kind]
    return ([edit] * (4 if kind in ("short_defensive", "own") else 1)) + rest, qs[seed]


def attempts(model, tok, snap: dict, probe: FamilyProbe, kind: str, seeds: int = 3,
             own: Sequence[dict] | None = None, progress: str = "attempt") -> dict:
    """Attempt ``kind`` of notebook 01 over seeds: for each seed ``s``, restore ``snap`` (the foundation),
    fine-tune on :func:`attempt_examples` (the seed also sets the data order; steps and batch size from
    :data:`ATTEMPTS`, lr :data:`LR`) and :meth:`FamilyProbe.measure`. Each seed's result is cached
    (:mod:`coursekit.cache`: examples, settings, this code and the training loop, library versions, the
    foundation's fingerprint) — so notebook 01 II reuses part I's runs.

    Returns ``{"values": {measure: [seeds, items] array}, "answers": [per seed], "why": [per seed],
    "loss": [per seed: the training losses], "trained": [per seed]}``."""
    from . import cache, finetune
    from .evidence import over_seeds
    from .models import restore

    kept: list = []
    cfg = ATTEMPTS.get(kind) or {}

    def one(seed: int) -> dict:
        examples, trained = attempt_examples(tok, probe.fam, kind, seed, own)

        def make() -> dict:
            restore(model, snap)
            _, hist = finetune.train(model, tok, examples, steps=cfg["steps"], lr=LR, batch_size=cfg["batch_size"],
                                     seed=seed, progress=f"{progress} (seed {seed})")
            out = probe.measure(model, trained, cfg["families"], cfg["with_open"])
            out["loss"] = [h["loss"] for h in hist]
            return out

        config = {"examples": examples, "trained": trained, "lr": LR, "seed": seed, **cfg, "probe": probe.settings()}
        out = cache.json("forgetting/attempt", config, make, code=[finetune.train, FamilyProbe, OldAbilities,
                                                                    generate_ids], weights=probe.weights)
        out["trained"] = trained
        kept.append(out)
        return out["values"]

    attempt_examples(tok, probe.fam, kind, 0, own)  # a bad kind / own is one line before any training
    values = over_seeds(one, seeds, progress=progress)
    restore(model, snap)
    return {"values": values, **{k: [o[k] for o in kept] for k in ("answers", "why", "loss", "trained")}}


TABLE_COLUMNS = ("reliability", "who_names", "non_who_names", "heads_broken", "superlatives_names", "who_forget",
                 "open_words", "open_ended")


def attempts_table(runs: dict, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """One line per attempt (``{name: {measure: [seeds, items] array}}``): the mean of each measure, rounded to
    2 decimals, ``-`` where the attempt did not measure it."""
    import numpy as np

    head = f"{'attempt':24s}" + "".join(f"{c[:12]:>13s}" for c in columns)
    rows = [f"{name:24s}" + "".join(f"{np.mean(v[c]):13.2f}" if c in v else f"{'-':>13s}" for c in columns)
            for name, v in runs.items()]
    return "\n".join([head, *rows])


def attempts_metrics(runs: dict, columns: Sequence[str] = TABLE_COLUMNS) -> dict:
    """The table's numbers as ``{"<attempt's first word>_<measure>": mean}`` for :func:`coursekit.record`."""
    import numpy as np

    return {f"{name.split()[0]}_{c}": float(np.mean(v[c])) for name, v in runs.items() for c in columns if c in v}


def plot_attempts(ax, runs: dict, measures: Sequence[tuple[str, str]], title: str = "") -> None:
    """Grouped bars: for each attempt of ``runs`` (skipping ``foundation``) the share of each ``(measure, label)``
    it measured, with its 95% interval over seeds and items (:func:`coursekit.evidence.interval`)."""
    import numpy as np

    from .evidence import interval

    names = [n for n in runs if n != "foundation"]
    w = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        pts = [(k, interval(runs[name][m])) for k, (m, _) in enumerate(measures) if m in runs[name]]
        if not pts:
            continue
        est = np.array([e for _, e in pts])
        ax.bar([k + (j - (len(names) - 1) / 2) * w for k, _ in pts], est[:, 0], w, label=name,
               yerr=np.array([est[:, 0] - est[:, 1], est[:, 2] - est[:, 0]]).clip(0), capsize=3)
    ax.set_xticks(range(len(measures)), [lab for _, lab in measures], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of probes")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)


def answers_widget(said: dict, fam: dict):
    """A widget to read every answer: ``said`` is ``{attempt: [per seed: {question: answer}]}``."""
    import ipywidgets as W

    def show(attempt, seed=0, family="who"):
        for q in fam[family]:
            print(f"  {q:50s} -> {said[attempt][seed].get(q, '(not asked in this attempt)')}")

    seeds = min(len(v) for v in said.values())
    return W.interact(show, attempt=W.Dropdown(options=list(said)), seed=W.IntSlider(min=0, max=seeds - 1),
                      family=W.Dropdown(options=[*NAMED, "open"]))


class FormatProbe:
    """The built format ability (JSON on request) and the narrow task, one value per item (notebook 01 II).

    ``FormatProbe(aligned, tok, skills, fam)`` keeps the aligned model's references; ``probe.measure(model)``
    returns ``{measure: [per item]}`` with ``json_valid`` (the greedy answer parses as JSON with the key) on
    ``fam["json_heldout"]`` — everyday questions *outside* the narrow task's template — and
    ``json_valid_template`` on the task's own sentences with the JSON instruction; ``json_prefix_logp`` (summed
    log-probability of the answer opening ``{"<key>": "``, teacher-forced, held-out questions);
    ``json_nll_rise`` (NLL rise of the aligned model's own JSON answers to them); ``task_margin``
    (log-probability of the gold emotion minus the best other one) and ``task_correct`` (margin > 0) on the
    task's ``task_eval`` sentences plus ``fam["emotion_heldout"]``."""

    def __init__(self, aligned, tok, skills: dict, fam: dict, max_new_tokens: int = 12):
        self.tok, self.skills, self.max_new_tokens = tok, skills, max_new_tokens
        self.questions = [json_question(skills, q) for q in fam["json_heldout"]]
        self.template = [json_question(skills, task_question(skills, r["text"])) for r in skills["task_eval"]]
        self.rows = list(skills["task_eval"]) + list(fam["emotion_heldout"])
        self.prefix = '{"' + skills["json_key"] + '": "'
        self.own = OldAbilities.build(aligned, tok, self.questions, max_new_tokens=max_new_tokens, progress=False)

    def settings(self) -> dict:
        return {"questions": self.questions, "template": self.template, "rows": self.rows,
                "max_new_tokens": self.max_new_tokens}

    def measure(self, model) -> dict:
        from .evaluate import parse_json, score_target_sets, score_targets

        tok, key = self.tok, self.skills["json_key"]
        outs = answers(model, tok, self.questions + self.template, self.max_new_tokens)
        ok = [float(isinstance(o, dict) and key in o) for o in map(parse_json, outs)]
        n = len(self.questions)
        prompts = [chat_prompt(tok, q) for q in self.questions]
        pre = score_targets(model, tok, prompts, [self.prefix] * n)
        emos = self.skills["emotions"]
        sets = score_target_sets(model, tok, [chat_prompt(tok, task_question(self.skills, r["text"])) for r in self.rows],
                                 [[e] * len(self.rows) for e in emos])  # one target set per emotion
        margin = []
        for i, r in enumerate(self.rows):
            lp = {e: sc[i]["logprob"] for e, sc in zip(emos, sets)}
            margin.append(lp[r["label"]] - max(v for e, v in lp.items() if e != r["label"]))
        return {"json_valid": ok[:n], "json_valid_template": ok[n:],
                "json_prefix_logp": [r["logprob"] for r in pre],
                "json_nll_rise": self.own.per_item(model, tok)["forgetting"],
                "task_margin": margin, "task_correct": [float(m > 0) for m in margin],
                "answers": outs[:3] + outs[n:n + 3]}


def narrow_curve(model, tok, snap: dict, probe: FormatProbe, examples: Sequence[dict], epochs: int, batch_size: int,
                 lr: float, seed: int, progress: bool | str = "narrow task") -> dict:
    """Narrow post-training (notebook 01 III): full fine-tuning from ``snap`` (the aligned model) on ``examples`` (the
    seed sets the data order), :meth:`FormatProbe.measure` after every epoch; never cached (the evidence store's
    records are made from it). ``{"curve": [per epoch], "loss": [...]}``."""
    from . import finetune
    from .models import restore

    per_epoch = max(1, len(examples) // batch_size)
    restore(model, snap)
    curve: list = []

    def after_epoch(step, m):
        curve.append(probe.measure(m))

    _, hist = finetune.train(model, tok, examples, steps=epochs * per_epoch, lr=lr, batch_size=batch_size,
                             seed=seed, callback=after_epoch, every=per_epoch,
                             progress=progress and f"{progress} (seed {seed})")
    return {"curve": curve, "loss": [h["loss"] for h in hist]}


def json_curve_record(config: dict, seed: int) -> dict:
    """One record of notebook 01 III (``evidence/plan/01_forgetting_a_skill_json.yaml``): the alignment stage (a
    cached model copy: it builds the JSON ability, the same for every seed), then :func:`narrow_curve` for ``seed``.
    Values ``<measure>_e<epoch>`` per item (epoch 0 = the aligned model): JSON questions ``json-NN``, the task's own
    sentences ``template-NN``, emotion rows ``row-NN``; extras: six sample answers per epoch and the losses."""
    from .models import load_model, snapshot

    model, tok = load_model()
    skills, fam = load_skills(), load_families()
    align = config["align"]
    model, _ = alignment_stage(model, tok, skills, steps=align["steps"], lr=align["lr"], progress=False)
    aligned = snapshot(model)
    probe = FormatProbe(model, tok, skills, fam)
    curve = [probe.measure(model)]
    run = narrow_curve(model, tok, aligned, probe, task_examples(tok, skills), config["epochs"], config["batch_size"],
                       config["lr"], seed, progress=False)
    curve += run["curve"]
    ids = {"json": [f"json-{i:02d}" for i in range(len(probe.questions))],
           "template": [f"template-{i:02d}" for i in range(len(probe.template))],
           "row": [f"row-{i:02d}" for i in range(len(probe.rows))]}
    items = {"json_valid": "json", "json_valid_template": "template", "json_prefix_logp": "json",
             "json_nll_rise": "json", "task_margin": "row", "task_correct": "row"}
    values = {f"{m}_e{e}": dict(zip(ids[kind], c[m])) for e, c in enumerate(curve) for m, kind in items.items()}
    return {"values": values, "extras": {"answers": [c["answers"] for c in curve], "loss": run["loss"]}}


# ------------------------------------------------------------------ the alignment stage (cached)

ALIGN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_stage(model, tok, examples: Sequence[dict], name: str, key_parts, steps: int = 20, lr: float = 1e-3,
               r: int = 8, batch_size: int = 4, cache: bool = True, progress: bool | str = True):
    """A cached LoRA training stage that *builds* an ability (JSON answers, refusals): LoRA (``r``, the
    attention projections) on ``examples``, merged back into the weights. Returns ``(model, history)``; the
    model is ready for full fine-tuning again (every weight trainable). With ``cache=True`` the merged
    attention weights are stored in the course cache (:mod:`coursekit.cache`), keyed by ``key_parts``, the
    examples and settings, this code and the fine-tuning loop, the library versions and the full
    fingerprint of the starting weights, and loaded instead of retraining next time (the saved float32
    weights are exactly the trained ones, so results do not change; the history is then empty)."""
    import torch

    from . import cache as course_cache
    from . import finetune

    if not isinstance(steps, int) or steps <= 0 or not (lr > 0):
        raise CourseError(f"{name} stage: steps and lr must be positive (got {steps}, {lr})")
    history: list = []

    def make() -> dict:
        nonlocal model, history
        model, history = finetune.train(model, tok, examples, steps=steps, lr=lr, batch_size=batch_size,
                                        lora=dict(r=r, target_modules=ALIGN_TARGETS), progress=progress)
        return {k: v for k, v in model.state_dict().items() if any(t in k for t in ALIGN_TARGETS)}

    if cache:
        config = {"key_parts": list(key_parts), "examples": list(examples), "steps": steps, "lr": lr, "r": r,
                  "batch_size": batch_size}
        saved = course_cache.tensors(f"forgetting/{name}", config, make, code=[finetune], weights=model)
        state = model.state_dict()
        with torch.no_grad():
            for k, v in saved.items():
                state[k].copy_(v)
    else:
        make()
    for p in model.parameters():  # peft's merge leaves the base weights frozen
        p.requires_grad_(True)
    model.eval()
    return model, history


def alignment_stage(model, tok, skills: dict, steps: int = 20, lr: float = 1e-3, r: int = 8,
                    batch_size: int = 4, cache: bool = True, progress: bool | str = "alignment stage"):
    """Give the model the JSON ability: a cached :func:`lora_stage` on :func:`alignment_examples`."""
    return lora_stage(model, tok, alignment_examples(tok, skills), "aligned",
                      [skills["align"], skills["json_key"], skills["json_instruction"]],
                      steps, lr, r, batch_size, cache, progress)
