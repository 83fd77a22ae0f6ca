"""Chat formatting and batched greedy generation.

Everything goes through the tokenizer's own chat template. SmolLM2's template inserts a default
system prompt ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") when none is
given; pass ``system=`` to replace it (that is how in-context notes are given in notebook 00).
"""
from __future__ import annotations

from typing import Sequence


def chat_prompt(tok, question: str, system: str | None = None, prefix: str = "") -> str:
    """The full prompt string for one user turn, ending where the assistant starts to speak.

    ``prefix`` is put at the start of the assistant's turn (e.g. ``"The Space Needle is in"``), so a
    short target like ``" Taipei."`` can be scored as its continuation.
    """
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text + prefix


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little compute goes to padding;
    callers put results back in the original order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def generate_ids(model, tok, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
                 progress: bool | str = False) -> list[list[int]]:
    """Greedy continuations of fully formatted prompts as token ids, in the prompts' order; each is cut
    after its first end-of-turn token (kept: stopping is part of the answer).

    Prompts of similar length are batched together (left padding): on a CPU one decoding step reads every
    weight whatever the batch, so 32 rows cost little more than 8 (32 answers of 24 tokens: 12 s at batch 32,
    21 s at batch 8, one thread)."""
    import torch
    from tqdm.auto import tqdm

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    it = length_batches(lengths, batch_size)
    if progress:
        it = tqdm(it, desc=progress if isinstance(progress, str) else "generate", leave=False)
    try:
        for idx in it:
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     temperature=None, top_p=None, top_k=None)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:].tolist()):
                cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                outs[i] = row[:cut]
    finally:
        tok.padding_side = old_side
    return outs


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
             progress: bool | str = False) -> list[str]:
    """Greedy continuations of fully formatted prompts (:func:`generate_ids`), as text without the
    end-of-turn token, stripped."""
    ids = generate_ids(model, tok, prompts, max_new_tokens, batch_size, progress)
    return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def chat(model, tok, questions, system: str | None = None, max_new_tokens: int = 48,
         batch_size: int = 32, progress: bool | str = False) -> list[str] | str:
    """Ask one question (returns a string) or many (returns a list), greedy."""
    single = isinstance(questions, str)
    qs = [questions] if single else list(questions)
    answers = generate(model, tok, [chat_prompt(tok, q, system) for q in qs], max_new_tokens,
                       batch_size, progress)
    return answers[0] if single else answers
