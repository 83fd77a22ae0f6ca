"""Fine-tuning with gradient descent and catastrophic forgetting (notebook 01; reused by 02/03).

What lives here (the training loop itself is :func:`coursekit.finetune.train`):

* the three data styles the lecture names for one piece of knowledge — pre-training text, SFT
  question/answer, DPO preference pair (:func:`three_styles`) — and a hand-written DPO loss
  (:func:`dpo_loss`, :func:`sequence_logprob`);
* per-token losses l1..lN of an answer (:func:`token_losses`), to see why the "Who is ... -> the name"
  shortcut has the same loss as the right logic;
* forgetting measurements: contamination by a new name in short greedy answers
  (:func:`contamination`), teacher-forced locality against the foundation model's own answers
  (:class:`coursekit.abilities.OldAbilities`), answer length on open questions (:func:`open_lengths`);
* an ability to build and then forget — answering in JSON when asked (:func:`json_ability`) — its
  "alignment stage" data (:func:`alignment_examples`), and a narrow post-training task (emotion of a
  sentence, :func:`task_examples`, :func:`task_accuracy`).

Data files (validated on load, one-line :class:`CourseError` naming file and field):

``data/forgetting_probes.json`` — an object with
    ``new_name`` (str, the name the fine-tune teaches), ``who_heldout`` (list[str], who-questions never
    trained on), ``non_who`` (list[str]), ``open`` (list[str], open questions whose answer length is
    measured), ``one_defensive`` ({question, answer}), ``uk_probe`` (str), ``nerdy_probe`` (str),
    ``defensive`` (list of {question, answer}: short human-written answers).
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
from .chat import chat_prompt, generate
from .data import field_fail, field_pairs, field_string, field_strings, load_json
from .errors import CourseError
from .evaluate import answer_length, json_rate, mention_rate
from .finetune import pretrain_example, sft_example

PROBES_FILE = "forgetting_probes.json"
SKILLS_FILE = "forgetting_skills.json"


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


def contamination(model, tok, questions: Sequence[str], name: str, max_new_tokens: int = 12) -> tuple[float, list[str]]:
    """Fraction of short greedy answers that mention ``name``, and the answers."""
    outs = answers(model, tok, questions, max_new_tokens)
    return mention_rate(outs, name), outs


def open_lengths(model, tok, questions: Sequence[str], max_new_tokens: int = 40) -> tuple[float, list[str]]:
    """Mean answer length in words on open questions (greedy, capped at ``max_new_tokens``)."""
    outs = answers(model, tok, questions, max_new_tokens)
    return answer_length(outs), outs


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


def task_accuracy(model, tok, skills: dict, split: str = "task_eval") -> float:
    """Teacher-forced: fraction of eval sentences whose most likely emotion (among ``emotions``,
    scored as the start of the answer) is the gold label."""
    from .evaluate import score_targets

    rows = skills[split]
    emos = skills["emotions"]
    prompts, targets = [], []
    for r in rows:
        p = chat_prompt(tok, task_question(skills, r["text"]))
        for e in emos:
            prompts.append(p)
            targets.append(e)
    sc = score_targets(model, tok, prompts, targets)
    right = 0
    for i, r in enumerate(rows):
        lps = [sc[i * len(emos) + j]["logprob"] for j in range(len(emos))]
        right += int(emos[max(range(len(emos)), key=lps.__getitem__)] == r["label"])
    return right / len(rows)


# ------------------------------------------------------------------ one scoreboard for every attempt

class Scoreboard:
    """Everything notebook 01 measures after each attempt, against the foundation model.

    ``Scoreboard(foundation, tok, edit, probes)`` stores the foundation model's references;
    ``board.measure(model, name)`` returns a dict with the harness' ``reliability`` / ``generality`` /
    ``locality`` (teacher-forced, EasyEdit style), ``locality_heldout`` (teacher-forced agreement with
    the foundation model's own answers to the held-out who-questions), ``who_contamination`` and
    ``nonwho_contamination`` (fraction of short greedy answers naming the new name) and the answers
    themselves under ``"answers"``. Every result is also kept in ``board.rows`` for the closing table.
    """

    def __init__(self, foundation, tok, edit: dict, probes: dict, max_new_tokens: int = 12,
                 loc_tokens: int = 16):
        from .evaluate import EditHarness

        self.tok = tok
        self.probes = probes
        self.name = probes["new_name"]
        self.max_new_tokens = max_new_tokens
        self.harness = EditHarness(tok, [edit])
        self.ref = self.harness.reference(foundation)
        self.locality = OldAbilities.build(foundation, tok, probes["who_heldout"], max_new_tokens=loc_tokens,
                                           progress=False)
        self.extra = [probes["one_defensive"]["question"], probes["uk_probe"], probes["nerdy_probe"]]
        self.rows: list[dict] = []

    def measure(self, model, name: str) -> dict:
        p = self.probes
        s = self.harness.evaluate(model, self.ref).summary
        qs = p["who_heldout"] + p["non_who"] + self.extra
        outs = answers(model, self.tok, qs, self.max_new_tokens)
        nw, nn = len(p["who_heldout"]), len(p["non_who"])
        who, non, extra = outs[:nw], outs[nw:nw + nn], outs[nw + nn:]
        row = {
            "attempt": name,
            "reliability": s["reliability"],
            "generality": s["generality"],
            "locality": s["locality"],
            "locality_heldout": self.locality(model, self.tok)["agreement"],
            "who_contamination": mention_rate(who, self.name),
            "nonwho_contamination": mention_rate(non, self.name),
            "answers": dict(zip(qs, outs)),
        }
        row.update({f"says_name[{q}]": self.name.lower() in a.lower() for q, a in zip(self.extra, extra)})
        self.rows.append(row)
        return row

    def table(self, keys=("reliability", "generality", "locality", "locality_heldout", "who_contamination",
                          "nonwho_contamination")) -> str:
        """The closing table: one line per attempt, numbers rounded to 2 decimals."""
        w = max([len("attempt")] + [len(r["attempt"]) for r in self.rows])
        head = "attempt".ljust(w) + "  " + "  ".join(k[:12].rjust(12) for k in keys)
        lines = [head]
        for r in self.rows:
            lines.append(r["attempt"].ljust(w) + "  " + "  ".join(f"{r[k]:12.2f}" for k in keys))
        return "\n".join(lines)


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
