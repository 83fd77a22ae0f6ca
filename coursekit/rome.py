"""Locating and editing one fact: causal tracing and ROME (Meng et al., 2022), written from the paper.

Notebooks 04 I-III. Everything is plain PyTorch on a Hugging Face Llama (``model.model.layers[L].mlp.down_proj``
is the matrix ROME edits: input = the MLP's hidden activation *k* (1536-d on SmolLM2), output = the
MLP's contribution *v* to the residual stream (576-d)).

* :func:`trace_fact` / :func:`trace_facts` (cached) — causal tracing: corrupt the subject's token
  embeddings with Gaussian noise (3 sigma), then restore one clean state (hidden state of layer l, or the
  MLP / attention outputs of a window of layers around l) at a token and measure how much of P(answer)
  comes back (the *indirect effect*); :func:`site_effects` and :func:`peak_layer` read them.
* :func:`compute_k` / :func:`compute_v` / :func:`rank_one_update` / :func:`apply_rome` — ROME:
  k* = mean down_proj input at the subject's last token over the bare prompt and sampled prefixes
  (:func:`context_prefixes`); v* = v_init + delta, delta optimised so the model emits the new target
  (NLL) while keeping the subject's "essence" (KL(edited || original) after the subject in
  "{subject} is a") with a norm penalty and a norm clamp; then the closed form in the form of the paper's
  code, W <- W + (v* - W k0) u^T / (u^T k0) with u = C^-1 k* and k0 the bare prompt's own key
  (:func:`context_keys`), so that W_new k0 = v* exactly: the edited prompt gets v* even when its key is far
  from the averaged one (a subject that starts the text is tokenised differently there: "L", "yon" vs " Lyon").
* :func:`generic_texts` / :func:`layer_stats` — C = E[k k^T] of the down_proj inputs over text the
  model samples itself (cached), for several layers in one pass.
* :func:`load_counterfact` / :func:`edit_scores` / :func:`drift` / :func:`edit_many` (cached) /
  :func:`edit_effects` — the course's CounterFact-style edits (neighbours share the true object), the
  teacher-forced scores with margins, CounterFact+ distracted neighbours, drift on held-out text, and
  C15's tests; :func:`finetune_edit` (the baseline at matched efficacy) and :func:`sequential_edits`.
* :func:`prepared` — part I's artefacts for the notebooks that build on it, through the cache.

Data file ``data/counterfact.jsonl`` (one JSON object per line, ``//`` comments allowed)::

    id            unique string
    subject       string, must occur in ``prompt`` and in every paraphrase (case-insensitive)
    prompt        completion-style prompt that ends where the object should follow
    target_true   what the foundation model says (leading space), e.g. " Paris"
    target_new    the counterfactual object, e.g. " Rome" (must differ from target_true)
    relation      optional string (the fact's relation)
    paraphrases   non-empty list of strings: other completion prompts for the same fact
    neighbourhood non-empty list of {"prompt": str, "target": str}: *other* subjects' prompts with the
                  same relation and the same true object (target == target_true), which an edit must
                  leave alone; never the edit's own subject
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .data import records_with_ids
from .errors import CourseError
from .evaluate import pad_right

# ---------------------------------------------------------------------------------------------- data


def load_counterfact(name: str | Path = "counterfact.jsonl") -> list[dict]:
    """The CounterFact-style edit requests (schema in this module's docstring), validated."""
    out = []
    for c, rec in records_with_ids(name):
        subj = c.string(rec, "subject")
        prompt = c.string(rec, "prompt")
        t_true = c.string(rec, "target_true")
        t_new = c.string(rec, "target_new")
        c.string(rec, "relation", required=False)
        if t_true.strip() == t_new.strip():
            c.fail("target_new", "must differ from target_true")
        if subj.lower() not in prompt.lower():
            c.fail("prompt", f"must contain the subject '{subj}'")
        par = rec.get("paraphrases")
        if not isinstance(par, list) or not par or not all(isinstance(p, str) and p.strip() for p in par):
            c.fail("paraphrases", "must be a non-empty list of non-empty strings")
        for j, p in enumerate(par):
            if subj.lower() not in p.lower():
                c.fail(f"paraphrases[{j}]", f"must contain the subject '{subj}'")
        nb = rec.get("neighbourhood")
        if not isinstance(nb, list) or not nb:
            c.fail("neighbourhood", "must be a non-empty list of {prompt, target}")
        for j, n in enumerate(nb):
            if not isinstance(n, dict):
                c.fail(f"neighbourhood[{j}]", "must be an object with 'prompt' and 'target'")
            c.string(n, "prompt", label=f"neighbourhood[{j}].prompt")
            c.string(n, "target", label=f"neighbourhood[{j}].target")
            if n["target"].strip() != t_true.strip():
                c.fail(f"neighbourhood[{j}].target", f"must be the edit's true object {t_true!r} (CounterFact: "
                       "neighbours share the relation and the true object, so bleed-over can show)")
            if subj.lower() in n["prompt"].lower():
                c.fail(f"neighbourhood[{j}].prompt", f"must be about another subject than '{subj}'")
        out.append(rec)
    return out


def edited_neighbours(recs: Sequence[dict]) -> list[tuple[str, str]]:
    """``(edit id, neighbour prompt)`` pairs where a neighbour prompt names a subject edited in ``recs``
    (empty for the course's data: sequential edits never score an edited subject as a neighbour)."""
    subjects = [r["subject"].lower() for r in recs]
    return [(r["id"], n["prompt"]) for r in recs for n in r["neighbourhood"]
            if any(s in n["prompt"].lower() for s in subjects)]


def request_from_edit(e: dict, tok) -> dict:
    """Turn a course edit of ``data/edits.jsonl`` (chat question + assistant prefix) into a ROME request.

    The prompt is the chat-formatted question with the assistant's prefix, so the subject's last
    token is the one inside the prefix ("The Space Needle is located in")."""
    from .chat import chat_prompt

    prompt = chat_prompt(tok, e["question"], prefix=e.get("prefix", ""))
    return dict(id=e["id"], subject=e["subject"], prompt=prompt, target_new=e["target_new"],
                target_true=e.get("target_true"))


# ----------------------------------------------------------------------------------------- tokens


def subject_span(tok, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions ``(first, last)`` of the *last* occurrence of ``subject`` in ``prompt``
    (case-insensitive), with the prompt tokenized without special tokens."""
    if not subject or not subject.strip():
        raise CourseError("subject must be a non-empty string")
    start = prompt.lower().rfind(subject.strip().lower())
    if start < 0:
        raise CourseError(f"subject '{subject}' does not occur in the prompt '{prompt[-80:]}'")
    end = start + len(subject.strip())
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    toks = [i for i, (a, b) in enumerate(offs) if b > start and a < end]
    if not toks:  # pragma: no cover - offsets always cover non-empty text
        raise CourseError(f"could not find the tokens of subject '{subject}'")
    return toks[0], toks[-1]


def _layers(model):
    try:
        return model.model.layers
    except AttributeError:
        raise CourseError("this model has no model.model.layers: ROME here supports Llama-style models") from None


def _check_layer(model, layer: int) -> int:
    n = len(_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise CourseError(f"layer must be an integer in [0, {n - 1}] (got {layer!r})")
    return layer


# ---------------------------------------------------------------------------------- causal tracing


@dataclass
class Trace:
    """Result of :func:`trace_fact`: ``effect[kind]`` is a (layers x tokens) array of P(answer) with
    that state restored; ``p_clean`` / ``p_corrupt`` are the two ends of the scale."""
    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]
    p_clean: float
    p_corrupt: float
    scores: dict = field(default_factory=dict)

    def indirect_effect(self, kind: str = "hidden"):
        """P_restored - P_corrupted for every (layer, token)."""
        return self.scores[kind] - self.p_corrupt


def embedding_sigma(model) -> float:
    """Standard deviation of the token embedding matrix (the noise scale unit of causal tracing)."""
    return float(model.get_input_embeddings().weight.detach().float().std())


POSITIONS = ("subject_first", "subject_last", "first_after", "last")


def _position(name, s0: int, s1: int, T: int) -> int:
    if isinstance(name, int) and -T <= name < T:
        return name % T
    where = {"subject_first": s0, "subject_last": s1, "first_after": min(s1 + 1, T - 1), "last": T - 1}
    if name not in where:
        raise CourseError(f"unknown trace position {name!r}: use a token index or one of {POSITIONS}")
    return where[name]


def trace_fact(model, tok, prompt: str, subject: str, answer: str | None = None, kinds: Sequence[str] = ("hidden", "mlp", "attn"),
               noise_samples: int = 10, noise: float = 3.0, window: int = 6, seed: int = 0,
               layer_step: int = 1, positions: Sequence | None = None, max_rows: int = 240) -> Trace:
    """Causal tracing of one fact (Meng et al. 2022, section 2.1).

    Corrupt the subject's token embeddings with N(0, (noise*sigma)^2) noise, ``noise_samples`` times;
    for each layer l and token i restore the clean state into the corrupted run and record
    P(first token of ``answer``) at the last position, averaged over the noise samples.
    ``kinds``: "hidden" restores the residual stream after layer l; "mlp" / "attn" restore the MLP /
    attention outputs of the ``window`` layers centred on l. ``answer`` defaults to the greedy token.
    ``layer_step`` > 1 traces every n-th layer only (rows in between are NaN) to save time on a CPU;
    ``positions`` (names of :data:`POSITIONS` or token indices) restores those tokens only (other
    columns NaN) — what a figure of the last subject token and the last token needs. Restorations are
    batched (``max_rows`` sequences per forward pass).
    """
    import numpy as np
    import torch

    for k in kinds:
        if k not in ("hidden", "mlp", "attn"):
            raise CourseError(f"unknown trace kind '{k}': use 'hidden', 'mlp' or 'attn'")
    if noise_samples < 1 or window < 1 or layer_step < 1:
        raise CourseError("noise_samples, window and layer_step must be >= 1")
    layers = _layers(model)
    nL = len(layers)
    s0, s1 = subject_span(tok, prompt, subject)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    T = len(ids)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    # clean run: remember every state we may restore
    clean: dict = {}
    hooks = []

    def keep(name):
        def h(mod, inp, out):
            clean[name] = (out[0] if isinstance(out, tuple) else out).detach()
        return h

    for l, layer in enumerate(layers):
        hooks += [layer.register_forward_hook(keep(("hidden", l))), layer.mlp.register_forward_hook(keep(("mlp", l))),
                  layer.self_attn.register_forward_hook(keep(("attn", l)))]
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    probs = torch.softmax(logits, -1)
    if answer is None:
        a_id = int(probs.argmax())
    else:
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        if not a_ids:
            raise CourseError(f"answer {answer!r} has no tokens")
        a_id = a_ids[0]
    p_clean = float(probs[a_id])
    g = torch.Generator().manual_seed(seed)
    sigma = embedding_sigma(model)
    d_model = clean[("hidden", 0)].shape[-1]
    eps = (torch.randn(noise_samples, s1 - s0 + 1, d_model, generator=g) * noise * sigma).to(dev)

    def corrupt(mod, inp, out):
        out = out.clone()
        n = out.shape[0]
        out[:, s0 : s1 + 1] += eps.repeat(n // noise_samples, 1, 1)
        return out

    def run(restores):
        """restores: list (one per restored row-group) of (kind, layers, token) or None; each group
        is repeated for every noise sample. Returns mean P(answer) per group."""
        G = len(restores)
        batch = x.repeat(G * noise_samples, 1)
        hs = [model.get_input_embeddings().register_forward_hook(corrupt)]
        by_module: dict = {}
        for gi, r in enumerate(restores):
            if r is None:
                continue
            kind, ls, tpos = r
            for l in ls:
                by_module.setdefault((kind, l), []).append((gi, tpos))

        def patch(key, rows):
            def h(mod, inp, out):
                t = out[0] if isinstance(out, tuple) else out
                t = t.clone()
                src = clean[key][0]
                for gi, tpos in rows:
                    t[gi * noise_samples : (gi + 1) * noise_samples, tpos] = src[tpos]
                return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
            return h

        for (kind, l), rows in by_module.items():
            mod = {"hidden": layers[l], "mlp": layers[l].mlp, "attn": layers[l].self_attn}[kind]
            hs.append(mod.register_forward_hook(patch((kind, l), rows)))
        try:
            with torch.no_grad():
                hid = model.model(input_ids=batch).last_hidden_state[:, -1]
                lg = model.lm_head(hid).float()
        finally:
            for h in hs:
                h.remove()
        p = torch.softmax(lg, -1)[:, a_id].view(G, noise_samples).mean(1)
        return p.cpu().numpy()

    p_corrupt = float(run([None])[0])
    cols = range(T) if positions is None else sorted({_position(p, s0, s1, T) for p in positions})
    per_run = max(1, max_rows // noise_samples)
    scores = {}
    for kind in kinds:
        grid = np.full((nL, T), np.nan)
        sites = [(l, t) for l in range(0, nL, layer_step) for t in cols]
        for a in range(0, len(sites), per_run):
            chunk = sites[a : a + per_run]
            ls = [[l] if kind == "hidden" else list(range(max(0, l - window // 2), min(nL, l - window // 2 + window)))
                  for l, _ in chunk]
            for (l, t), p in zip(chunk, run([(kind, w, t) for w, (_, t) in zip(ls, chunk)])):
                grid[l, t] = p
        scores[kind] = grid
    return Trace(prompt=prompt, subject=subject, answer=tok.decode([a_id]), tokens=[tok.decode([i]) for i in ids],
                 subject_range=(s0, s1), p_clean=p_clean, p_corrupt=p_corrupt, scores=scores)


def trace_facts(model, tok, recs: Sequence[dict], progress: bool = True, cache: bool = True, **kw) -> list[Trace]:
    """:func:`trace_fact` of every record (prompt, subject, true object; keyword arguments passed on),
    cached in the course cache as one entry."""
    import numpy as np
    from tqdm.auto import tqdm

    from . import cache as course_cache

    facts = [(r["prompt"], r["subject"], r["target_true"]) for r in recs]

    def make() -> list[dict]:
        out = []
        for p, s, a in tqdm(facts, desc="causal tracing", disable=not progress, leave=False):
            tr = trace_fact(model, tok, p, s, a, **kw)
            out.append(dict(tr.__dict__, scores={k: v.tolist() for k, v in tr.scores.items()}))
        return out

    rows = course_cache.json("rome/trace", {"facts": facts, **kw}, make, weights=model) if cache else make()
    return [Trace(**dict(r, subject_range=tuple(r["subject_range"]),
                         scores={k: np.array(v, dtype=float) for k, v in r["scores"].items()})) for r in rows]


def site_effects(traces: Sequence[Trace], kind: str, position="subject_last"):
    """Indirect effect of restoring ``kind`` at a named position (:data:`POSITIONS`) in every trace:
    an array ``[facts, layers]`` (NaN where a layer was not traced)."""
    import numpy as np

    out = []
    for tr in traces:
        ie = tr.indirect_effect(kind)
        out.append(ie[:, _position(position, *tr.subject_range, ie.shape[1])])
    return np.stack(out)


def align_traces(traces: Sequence[Trace], kind: str = "hidden"):
    """Average indirect effects over facts of different lengths on ROME's 6 token groups:
    first subject token, middle subject tokens, last subject token, first token after the subject,
    further tokens, last token. Returns ``(labels, array layers x 6)`` (NaN-safe mean)."""
    import numpy as np

    labels = ["first subject", "middle subject", "last subject", "first after", "further", "last token"]
    acc = []
    for tr in traces:
        ie = tr.indirect_effect(kind)
        T = ie.shape[1]
        s0, s1 = tr.subject_range
        groups = [[s0], list(range(s0 + 1, s1)), [s1], [s1 + 1] if s1 + 1 < T - 1 else [],
                  list(range(s1 + 2, T - 1)), [T - 1]]
        cols = [ie[:, g].mean(1) if g else np.full(ie.shape[0], np.nan) for g in groups]
        acc.append(np.stack(cols, 1))
    return labels, np.nanmean(np.stack(acc), 0)


# --------------------------------------------------------------------------------- ROME: k*, v*, C

_PREFIX_SEEDS = ["The", "Therefore", "Because", "I", "You", "However", "In the", "When", "After", "It is",
                 "She", "We", "My", "This", "Today", "Once", "Why", "According to", "If", "Many"]


def sample_texts(model, tok, openings: Sequence[str], max_new_tokens: int, seed: int = 0, top_k: int | None = None,
                 batch_size: int = 32, progress: str | None = None, full_length: bool = False) -> list[str]:
    """One *sampled* continuation (temperature 1; ``top_k`` if given) of each opening, no chat template,
    ``torch.manual_seed(seed)`` before the first batch: the same texts on every run of one machine.
    ``full_length``: never stop at the end-of-text token, so every continuation has ``max_new_tokens``."""
    import torch
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or not openings:
        raise CourseError("sample_texts() needs openings and max_new_tokens >= 1")
    dev = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    torch.manual_seed(seed)
    try:
        for s in tqdm(range(0, len(openings), batch_size), desc=progress, disable=progress is None, leave=False):
            enc = tok(list(openings[s : s + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**{k: v.to(dev) for k, v in enc.items()}, do_sample=True, top_k=top_k or 0,
                                     top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                                     min_new_tokens=max_new_tokens if full_length else 0,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def context_prefixes(model, tok, n: int = 20, lengths: Sequence[int] = (5, 10), seed: int = 0, cache: bool = True) -> list[str]:
    """ROME's random contexts of k* and v* ("{prefix}. {prompt}"): ``n`` short texts the model samples
    itself (top-k 5, as ROME), from varied first words, their lengths cycling through ``lengths`` tokens
    (ROME: 10 of 5 and 10 of 10 tokens). Cached in the course cache."""
    from . import cache as course_cache

    if not 0 <= n <= len(_PREFIX_SEEDS):
        raise CourseError(f"context_prefixes(): n must be in [0, {len(_PREFIX_SEEDS)}] (got {n})")

    def make() -> list[str]:
        out = []
        for j, length in enumerate(lengths):
            seeds = _PREFIX_SEEDS[j:n:len(lengths)]
            if seeds:
                outs = sample_texts(model, tok, seeds, length, seed=seed + j, top_k=5)
                out += [" ".join(f"{s} {o}".replace("{", " ").replace("}", " ").split()).rstrip(".") for s, o in zip(seeds, outs)]
        return out

    if not cache:
        return make()
    return course_cache.json("rome/prefixes", {"n": n, "lengths": list(lengths), "seed": seed}, make,
                             code=[sample_texts], weights=model)


def _contexts(prompt: str, prefixes: Sequence[str]) -> list[str]:
    return [prompt] + [f"{p}. {prompt}" for p in prefixes]


def _down_proj(model, layer: int):
    return _layers(model)[_check_layer(model, layer)].mlp.down_proj


def _skipped_layer():
    """A stand-in for a decoder layer whose output is already known: returns its input unchanged."""
    import torch

    class SkippedLayer(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    return SkippedLayer()


@contextmanager
def _layers_below_once(model, layer: int):
    """Run the layers below ``layer`` once for a batch that is run many times.

    Inside, every forward records or reuses the input of ``layer``; calling the yielded ``skip()`` after a first
    forward replaces the layers below ``layer`` by stand-ins, so later forwards of the same batch start from the
    recorded input. v*'s delta is added inside ``layer``: nothing below it depends on the delta, so v* is
    bitwise the same (tested) and each Adam step saves ``layer``/n_layers of a forward."""
    layers = _layers(model)
    own, kept = [layers[i] for i in range(layer)], {}

    def record_or_reuse(mod, args, kwargs):
        if "h" not in kept:
            kept["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            return None
        return ((kept["h"],) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kept["h"]})

    def skip():
        if "h" not in kept:
            raise RuntimeError("skip() needs a first forward through the model")
        for i in range(layer):
            layers[i] = _skipped_layer()

    h = layers[layer].register_forward_pre_hook(record_or_reuse, with_kwargs=True)
    try:
        yield skip
    finally:
        h.remove()
        for i, m in enumerate(own):
            layers[i] = m


def context_keys(model, tok, layer: int, prompt: str, subject: str, prefixes: Sequence[str] = ()):
    """The down_proj input at the subject's last token in the bare prompt (row 0) and in each prefixed prompt
    (rows 1..): a 2-D tensor (1 + len(prefixes), d_ff), from one batched forward."""
    import torch

    ctx = _contexts(prompt, prefixes)
    seqs = [tok(c, add_special_tokens=False)["input_ids"] for c in ctx]
    idx = [subject_span(tok, c, subject)[1] for c in ctx]
    ids, att = pad_right(tok, seqs)
    got = {}
    h = _down_proj(model, layer).register_forward_pre_hook(lambda m, inp: got.__setitem__("k", inp[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids.to(next(model.parameters()).device), attention_mask=att.to(next(model.parameters()).device))
    finally:
        h.remove()
    return torch.stack([got["k"][i, j] for i, j in enumerate(idx)]).float()


def compute_k(model, tok, layer: int, prompt: str, subject: str, prefixes: Sequence[str] = ()):
    """k*: :func:`context_keys` averaged over the bare prompt and the prefixed prompts (1-D, d_ff)."""
    return context_keys(model, tok, layer, prompt, subject, prefixes).mean(0)


@dataclass
class VResult:
    v: "object"          # v* (d_model)
    v_init: "object"     # the down_proj output at the subject's last token before the edit
    delta_norm: float
    steps: int
    history: list        # per step: total, nll, kl, wd


def compute_v(model, tok, layer: int, prompt: str, subject: str, target: str, prefixes: Sequence[str] = (),
              steps: int = 20, lr: float = 0.5, kl_weight: float = 0.0625, weight_decay: float = 0.5,
              clamp: float = 4.0, stop_loss: float = 0.05) -> VResult:
    """v*: optimise delta added to down_proj's output at the subject's last token (ROME eq. 4).

    loss = mean over contexts of NLL(target | "{prefix}. {prompt}")            (make the new fact true)
         + kl_weight * KL(P_edited || P_orig) of the next token after the subject's last token in
           "{subject} is a" (ROME's direction and position)                   (keep the subject's essence)
         + weight_decay * ||delta|| / ||v_init||^2                           (stay small)
    Adam(lr), early stop when the NLL < ``stop_loss``; ||delta|| is clamped to clamp * ||v_init||. (ROME
    stops on the total loss; with this model the norm penalty alone stays above 0.05, so that rule would
    always run every step: we stop once the new object is likely.) ROME's defaults: 20 steps, lr 0.5,
    kl_weight 0.0625, weight_decay 0.5, clamp 4.
    """
    import torch

    if steps < 1 or lr <= 0:
        raise CourseError(f"compute_v() needs steps >= 1 and lr > 0 (got {steps}, {lr})")
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not t_ids:
        raise CourseError(f"target {target!r} has no tokens")
    dev = next(model.parameters()).device
    ctx = _contexts(prompt, prefixes)
    kl_prompt = f"{subject.strip()} is a"
    rows, pos, tgt_pos = [], [], []
    for c in ctx:
        p = tok(c, add_special_tokens=False)["input_ids"]
        rows.append(p + t_ids)
        pos.append(subject_span(tok, c, subject)[1])
        tgt_pos.append(len(p))
    kp = tok(kl_prompt, add_special_tokens=False)["input_ids"]
    rows.append(kp)
    pos.append(subject_span(tok, kl_prompt, subject)[1])
    ids, att = pad_right(tok, rows)
    ids, att = ids.to(dev), att.to(dev)
    n_ctx = len(ctx)
    down = _down_proj(model, layer)
    state = {"delta": None}
    init = {}

    def add_delta(mod, inp, out):
        if "v" not in init:
            init["v"] = out[0, pos[0]].detach().clone()
        if state["delta"] is None:
            return out
        out = out.clone()
        for r, j in enumerate(pos):
            out[r, j] = out[r, j] + state["delta"]
        return out

    h = down.register_forward_hook(add_delta)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    history = []
    try:
        with _layers_below_once(model, layer) as skip_below:
            with torch.no_grad():  # original essence distribution and v_init
                lg0 = model(input_ids=ids, attention_mask=att).logits
                kl_ref = torch.log_softmax(lg0[n_ctx, pos[n_ctx]].float(), -1)
            skip_below()  # the layers below the edit layer do not depend on delta
            v_init = init["v"].float()
            delta = torch.zeros_like(v_init, requires_grad=True)
            state["delta"] = delta
            opt = torch.optim.Adam([delta], lr=lr)
            max_norm = clamp * v_init.norm()
            tt = torch.tensor(t_ids, device=dev)
            step = 0
            for step in range(1, steps + 1):
                hid = model.model(input_ids=ids, attention_mask=att).last_hidden_state
                # logits only where they are needed (the target positions and the essence position)
                nll = torch.stack([-torch.log_softmax(model.lm_head(hid[r, tp - 1 : tp - 1 + len(t_ids)]).float(), -1)
                                   [torch.arange(len(t_ids), device=dev), tt].mean() for r, tp in enumerate(tgt_pos)]).mean()
                kl_new = torch.log_softmax(model.lm_head(hid[n_ctx, pos[n_ctx]]).float(), -1)
                # kl_div(input, target) = KL(target || input): KL(edited || original), the paper's direction
                kl = torch.nn.functional.kl_div(kl_ref, kl_new, log_target=True, reduction="sum")
                wd = weight_decay * delta.norm() / v_init.norm() ** 2
                loss = nll + kl_weight * kl + wd
                history.append(dict(total=loss.item(), nll=nll.item(), kl=kl.item(), wd=wd.item()))
                if nll.item() < stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    d = delta.detach()
    return VResult(v=(v_init + d), v_init=v_init, delta_norm=float(d.norm()), steps=step, history=history)


def generic_texts(model, tok, n: int = 128, length: int = 160, seed: int = 0, cache: bool = True) -> list[str]:
    """Generic text made offline by the model itself (we have no Wikipedia): ``n`` *sampled* continuations
    (temperature 1) of exactly ``length`` tokens from varied, topic-free openings (the list is cycled, so openings
    repeat with different continuations). ``seed`` gives another, disjoint sample: the covariance C is
    estimated on one seed and the drift of an edit measured on another. Cached in the course cache."""
    from . import cache as course_cache

    openings = ["The history of", "In the morning,", "Scientists have found that", "My favourite recipe",
                "The city council", "A good way to learn", "The weather today", "When the war ended,",
                "The company announced", "Music is", "In mathematics,", "The football team", "Children often",
                "The river flows", "Doctors recommend", "The new law", "Once upon a time,", "The computer",
                "Farmers in the region", "The museum", "Economists say", "The film tells", "Birds can",
                "The university", "During the summer,", "The king", "Water is", "Many people believe",
                "The train station", "Art in the", "The president said", "Software engineers", "The ocean",
                "In ancient times,", "The book describes", "Students should", "The hospital", "Electricity",
                "The election", "A healthy diet", "The mountain", "Languages", "The market", "Planets",
                "The village", "Technology has", "The church", "Olympic athletes", "The restaurant", "Rain",
                "The small town", "Historians", "The chemical reaction", "Every winter", "The airport",
                "The novel", "Dogs and cats", "The bridge", "Religion", "The island", "Modern medicine",
                "The painting", "The army", "Coffee"]
    if n < 1 or length < 1:
        raise CourseError(f"generic_texts(): n and length must be >= 1 (got {n}, {length})")
    heads = [openings[(i + 7 * seed) % len(openings)] for i in range(n)]

    def make() -> list[str]:
        outs = sample_texts(model, tok, heads, length, seed=1000 + seed, batch_size=min(n, 160), progress="generic text",
                            full_length=True)
        return [f"{o} {t}".strip() for o, t in zip(heads, outs)]

    if not cache:
        return make()
    return course_cache.json("rome/generic", {"n": n, "length": length, "seed": seed}, make, code=[sample_texts],
                             weights=model)


def layer_stats(model, tok, layers: Sequence[int], texts: Sequence[str], batch_size: int = 8, cache: bool = True):
    """C = E[k k^T]: uncentred second moment of the down_proj inputs of each of ``layers`` over every
    token of ``texts`` (one pass for all layers). Cached (safetensors) in the course cache, keyed by the
    layers and the texts. Returns ``({layer: C}, n_tokens)``."""
    import torch

    from . import cache as course_cache

    if not texts:
        raise CourseError("layer_stats() needs some text")
    layers = sorted({_check_layer(model, int(l)) for l in layers})
    if not layers:
        raise CourseError("layer_stats() needs at least one layer")

    def make() -> dict:
        d_in = _down_proj(model, layers[0]).in_features
        S = {l: torch.zeros(d_in, d_in, dtype=torch.float64) for l in layers}
        cur, n = {}, 0
        hs = [_down_proj(model, l).register_forward_pre_hook(lambda m, inp, l=l: cur.__setitem__(l, inp[0].detach()))
              for l in layers]
        dev = next(model.parameters()).device
        try:
            for s in range(0, len(texts), batch_size):
                seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[s : s + batch_size]]
                ids, att = pad_right(tok, seqs)
                with torch.no_grad():
                    model.model(input_ids=ids.to(dev), attention_mask=att.to(dev))
                keep = att.bool().to(dev)
                for l in layers:
                    k = cur[l][keep].double().cpu()
                    S[l] += k.T @ k
                n += int(keep.sum())
        finally:
            for h in hs:
                h.remove()
        return {**{f"C{l}": (S[l] / n).float() for l in layers}, "n": torch.tensor([n])}

    d = (course_cache.tensors("rome/cov", {"layers": layers, "texts": list(texts), "batch_size": batch_size}, make,
                              weights=model) if cache else make())
    return {l: d[f"C{l}"] for l in layers}, int(d["n"].item())


# ------------------------------------------------------------------------------ the rank-one update


def _u(k, C=None, damping: float = 0.0):
    """``C^-1 k`` in float64 (``C=None``: C = I); ``damping`` adds ``damping * mean(diag C) * I`` to C."""
    import torch

    k64 = k.detach().double().flatten()
    if C is None:
        return k64
    C64 = C.detach().double()
    if C64.shape != (k64.numel(), k64.numel()):
        raise CourseError(f"rank_one_update(): C must be {k64.numel()}x{k64.numel()} (got {tuple(C.shape)})")
    if damping:
        C64 = C64 + damping * C64.diagonal().mean() * torch.eye(len(k64), dtype=C64.dtype)
    return torch.linalg.solve(C64, k64)


def rank_one_update(W, k, v, C=None, damping: float = 0.0, k0=None):
    """ROME's closed form: ``W + (v - W k0) u^T / (u^T k0)`` with ``u = C^-1 k``.

    ``W`` is a Linear weight (out x in, y = W x), ``k`` (in), ``v`` (out). With ``k0=None`` (k0 = k) this is the
    paper's eq. 2, ``W + (v - W k) (C^-1 k)^T / ((C^-1 k)^T k)``. The paper's code writes the value at ``k0``, the
    key of the bare edit prompt, while ``u`` comes from ``k`` = k*, the key averaged over prefixed contexts: the
    edited prompt then gets ``v`` exactly, ``W_new k0 = v``, whatever k* is. ``C=None`` means C = I (EasyEdit's
    default). ``damping`` adds ``damping * mean(diag C) * I`` to C before solving. Returns a new tensor; ``W`` is
    untouched."""
    import torch

    W64, k64, v64 = W.detach().double(), k.detach().double().flatten(), v.detach().double().flatten()
    if W64.dim() != 2 or W64.shape[1] != k64.numel() or W64.shape[0] != v64.numel():
        raise CourseError(f"rank_one_update(): W is {tuple(W.shape)} but k has {k64.numel()} and v "
                          f"{v64.numel()} entries (need W: len(v) x len(k))")
    a64 = k64 if k0 is None else k0.detach().double().flatten()
    if a64.shape != k64.shape:
        raise CourseError(f"rank_one_update(): k0 has {a64.numel()} entries, k has {k64.numel()}")
    u = _u(k64, C, damping)
    denom = u @ a64
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise CourseError("rank_one_update(): (C^-1 k)^T k0 is zero or not finite; is k all zeros or C singular?")
    W_new = W64 + torch.outer(v64 - W64 @ a64, u) / denom
    return W_new.to(W.dtype)


@dataclass
class EditRecord:
    """What one ROME edit did (enough to undo it: ``old_weight``)."""
    layer: int
    k: "object"          # k*, averaged over the contexts: it sets the update's direction u = C^-1 k*
    v: "object"
    k0: "object"         # the bare edit prompt's own key: where the value is written
    old_weight: "object"
    delta_norm: float
    v_steps: int
    seconds: float
    residual: float      # ||W_new k0 - v*|| / ||v*||
    key_alignment: float  # u.k0 / u.k*: 1 when the bare prompt's key is the averaged one (eq. 2 = the code's form)
    history: list


def apply_rome(model, tok, request: dict, layer: int, C=None, prefixes: Sequence[str] = (), damping: float = 0.0,
               kv: tuple | None = None, **v_kwargs) -> EditRecord:
    """Edit ``model`` in place so that ``request['prompt']`` (containing ``request['subject']``)
    continues with ``request['target_new']``: :func:`rank_one_update` with u from k* and the value written at
    k0, the bare prompt's key, as the paper's code does. ``kv=(k*, v*, k0)`` reuses precomputed keys and value."""
    import torch

    for f in ("prompt", "subject", "target_new"):
        if not isinstance(request.get(f), str) or not request[f].strip():
            raise CourseError(f"ROME request needs a non-empty string '{f}'")
    t0 = time.perf_counter()
    down = _down_proj(model, layer)
    hist, steps, dn = [], 0, 0.0
    if kv is None:
        keys = context_keys(model, tok, layer, request["prompt"], request["subject"], prefixes)
        k, k0 = keys.mean(0), keys[0]
        vr = compute_v(model, tok, layer, request["prompt"], request["subject"], request["target_new"], prefixes, **v_kwargs)
        v, hist, steps, dn = vr.v, vr.history, vr.steps, vr.delta_norm
    else:
        k, v, k0 = kv
    old = down.weight.detach().clone()
    W_new = rank_one_update(old, k, v, C, damping, k0=k0)
    u = _u(k, C, damping)
    with torch.no_grad():
        down.weight.copy_(W_new)
        res = float((down.weight.double() @ k0.double() - v.double()).norm() / v.double().norm())
    return EditRecord(layer=layer, k=k, v=v, k0=k0, old_weight=old, delta_norm=dn, v_steps=steps,
                      seconds=time.perf_counter() - t0, residual=res,
                      key_alignment=float((u @ k0.double()) / (u @ k.double())), history=hist)


def undo(model, rec: EditRecord) -> None:
    """Put back the down_proj weight an edit replaced."""
    import torch

    with torch.no_grad():
        _down_proj(model, rec.layer).weight.copy_(rec.old_weight)


# -------------------------------------------------------------------------------------- evaluation


def _mean_logprob(model, tok, prompts, targets):
    from .evaluate import score_targets

    r = score_targets(model, tok, prompts, targets)
    return [x["logprob"] / x["n"] for x in r], r


def knows_fact(model, tok, rec: dict) -> dict:
    """Does the foundation model know ``rec``? Greedy first token = first token of target_true, and
    P(true) > P(new) (mean per-token log-probability) on the prompt."""
    import torch

    ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
    top = int(lg.argmax())
    first_true = tok(rec["target_true"], add_special_tokens=False)["input_ids"][0]
    (lt, ln), _ = _mean_logprob(model, tok, [rec["prompt"]] * 2, [rec["target_true"], rec["target_new"]])
    return dict(id=rec["id"], greedy=tok.decode([top]), greedy_ok=top == first_true, true_beats_new=lt > ln,
                known=(top == first_true) and lt > ln)


def distracting_prompts(rec: dict) -> list[str]:
    """CounterFact+ (Hoelscher-Obermaier et al. 2023): each neighbour prompt behind the edited fact itself
    ("Lyon is a city in the country of Germany. Bordeaux is a city in the country of"), so an edit that
    fires on the *context* rather than the subject shows up."""
    return [f"{rec['prompt']}{rec['target_new']}. {n['prompt']}" for n in rec["neighbourhood"]]


def edit_scores(model, tok, rec: dict) -> dict:
    """Scores of one CounterFact edit; P(x) = mean per-token probability of object x (teacher-forced).

    Shares (CounterFact): ``efficacy`` = [P(new) > P(true)] on the prompt, ``paraphrase`` = the share of
    paraphrases with P(new) > P(true), ``neighbourhood`` = the share of neighbours (other subjects, same
    relation, same true object) with P(true) > P(new), ``distracted`` = the same on :func:`distracting_prompts`.
    Margins (continuous, in nats): ``*_margin`` = the mean log P(new) - log P(true) on the edit's own
    prompts, log P(true) - log P(new) on neighbours (so higher is better everywhere). ``paraphrase_start`` /
    ``paraphrase_mid`` (and their margins): the paraphrases whose text starts with the subject / has it
    mid-sentence (NaN when there is none). ``greedy_*``: the same shares from greedy generation — the
    continuation starts with the new object (prompt, paraphrases) or with the neighbour's own object."""
    import math

    prompts = [rec["prompt"]] + list(rec["paraphrases"])
    nbp = [n["prompt"] for n in rec["neighbourhood"]] + distracting_prompts(rec)
    allp = prompts + nbp
    r_new = _mean_logprob(model, tok, allp + allp, [rec["target_new"]] * len(allp) + [rec["target_true"]] * len(allp))[0]
    d = [a - b for a, b in zip(r_new[: len(allp)], r_new[len(allp):])]   # log P(new) - log P(true)
    P, N = len(prompts), len(rec["neighbourhood"])
    start = [p.lower().startswith(rec["subject"].lower()) for p in prompts]
    groups = {"efficacy": d[:1], "paraphrase": d[1:P], "neighbourhood": [-x for x in d[P : P + N]],
              "distracted": [-x for x in d[P + N:]],
              "paraphrase_start": [x for x, s in zip(d[1:P], start[1:]) if s],
              "paraphrase_mid": [x for x, s in zip(d[1:P], start[1:]) if not s]}
    out = {}
    for k, g in groups.items():
        out[k] = sum(x > 0 for x in g) / len(g) if g else math.nan
        out[f"{k}_margin"] = sum(g) / len(g) if g else math.nan
    out.update(_greedy_scores(model, tok, rec, prompts))
    return out


def _greedy_scores(model, tok, rec: dict, prompts: Sequence[str]) -> dict:
    """``greedy_efficacy`` / ``greedy_paraphrase`` (continuations that start with the new object) and
    ``greedy_neighbourhood`` (neighbours whose continuation starts with their own object)."""
    from .chat import generate

    nb = list(rec["neighbourhood"])
    targets = [rec["target_new"], rec["target_true"]] + [n["target"] for n in nb]
    n_tok = 1 + max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in targets)
    said = generate(model, tok, list(prompts) + [n["prompt"] for n in nb], max_new_tokens=n_tok)
    hit = [s.startswith(t.strip()) for s, t in zip(said, [rec["target_new"]] * len(prompts) + [n["target"] for n in nb])]
    share = lambda xs: sum(xs) / len(xs)
    return {"greedy_efficacy": float(hit[0]), "greedy_paraphrase": share(hit[1:len(prompts)]),
            "greedy_neighbourhood": share(hit[len(prompts):])}


def next_token_logprobs(model, tok, texts: Sequence[str], max_tokens: int = 64):
    """log-softmax of the next-token distribution at every position of ``texts`` (each cut to
    ``max_tokens``): a reference for :func:`drift`. Returns a ``[positions, vocab]`` tensor."""
    import torch

    seqs = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    ids, att = pad_right(tok, seqs)
    dev = next(model.parameters()).device
    with torch.no_grad():
        lg = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float()
    return torch.log_softmax(lg[att.bool().to(dev)], -1).cpu()


def drift(model, tok, texts: Sequence[str], reference, max_tokens: int = 64) -> float:
    """Mean per-token KL(original || edited) of the next-token distribution on ``texts`` (nats), with
    ``reference`` = :func:`next_token_logprobs` of the unedited model on the same texts."""
    import torch

    now = next_token_logprobs(model, tok, texts, max_tokens)
    if now.shape != reference.shape:
        raise CourseError("drift(): the reference was computed on other texts (shapes differ)")
    return float(torch.nn.functional.kl_div(now, reference, log_target=True, reduction="sum") / now.shape[0])


def mean_scores(rows: Sequence[dict]) -> dict:
    """Average every numeric key over rows (NaN entries, e.g. a paraphrase group an edit lacks, left out)."""
    import math

    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    out = {}
    for k in keys:
        xs = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(xs) / len(xs) if xs else math.nan
    return out


# ------------------------------------------------------------------------------------ baselines


def known_requests(model, tok, recs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(known, checks)``: the requests the model knows (:func:`knows_fact`) and every check."""
    checks = [knows_fact(model, tok, r) for r in recs]
    return [r for r, c in zip(recs, checks) if c["known"]], checks


def peak_layer(traces: Sequence[Trace], kind: str = "mlp", position="subject_last") -> int:
    """The edit layer read off causal tracing: the traced layer where the mean indirect effect of
    restoring ``kind`` at ``position`` over the facts is largest."""
    import numpy as np

    eff = site_effects(traces, kind, position)
    traced = np.flatnonzero(~np.isnan(eff).all(0))   # layers a trace restored (layer_step skips the others)
    if traced.size == 0:
        raise CourseError(f"peak_layer(): no layer of these traces restored {kind!r} at {position!r}")
    return int(traced[np.argmax(np.nanmean(eff[:, traced], 0))])


HELD_OUT = dict(n=8, length=48, seed=1)   # the drift texts: another sample than C's, never used to estimate it


def prepared(model, tok, n_trace: int, noise_runs: int, layer_step: int, n_texts: int, text_len: int, n_prefix: int,
             sweep: Sequence[int] = (), window: int = 6):
    """Part I's artefacts for the notebooks that build on it, each through the course cache (computed when
    absent, so a notebook runs alone): the known requests, the traces of the first ``n_trace``, the edit
    layer they give (:func:`peak_layer`), C at that layer and at ``sweep`` layers, the held-out drift texts
    and the context prefixes. Returns a namespace with those names."""
    from types import SimpleNamespace

    recs, _ = known_requests(model, tok, load_counterfact())
    traces = trace_facts(model, tok, recs[:n_trace], noise_samples=noise_runs, window=window, layer_step=layer_step,
                         positions=["subject_last", "last"])
    layer = peak_layer(traces)
    texts = generic_texts(model, tok, n_texts, text_len, seed=0)
    Cs, n_tok = layer_stats(model, tok, [layer, *sweep], texts)
    return SimpleNamespace(recs=recs, traces=traces, layer=layer, Cs=Cs, C=Cs[layer], n_tok=n_tok,
                           held_out=generic_texts(model, tok, **HELD_OUT), prefixes=context_prefixes(model, tok, n_prefix))


def edit_many(model, tok, recs: Sequence[dict], layer: int, C, prefixes: Sequence[str], held_out: Sequence[str],
              damping: float = 0.0, steps: int = 20, progress: bool = True, cache: bool = True) -> list[dict]:
    """Every request on the unedited weights (each edit undone before the next): ROME with the real ``C``
    and, from the same k* and v*, with C = I. Per edit: ``C`` / ``I`` = :func:`edit_scores`, ``drift_C`` /
    ``drift_I`` = :func:`drift` on ``held_out``, the edit's ``seconds`` (when computed) and ``v_steps``.
    Cached in the course cache (keyed by the requests, layer, C, prefixes and texts)."""
    import hashlib

    from tqdm.auto import tqdm

    from . import cache as course_cache

    def make() -> list[dict]:
        ref = next_token_logprobs(model, tok, held_out)
        out = []
        for r in tqdm(list(recs), desc="ROME edits", disable=not progress, leave=False):
            e = apply_rome(model, tok, r, layer, C, prefixes, damping, steps=steps)
            row = dict(id=r["id"], seconds=e.seconds, v_steps=e.v_steps, key_alignment=e.key_alignment,
                       C=edit_scores(model, tok, r),
                       drift_C=drift(model, tok, held_out, ref))
            undo(model, e)
            e_i = apply_rome(model, tok, r, layer, None, kv=(e.k, e.v, e.k0))
            row.update(I=edit_scores(model, tok, r), drift_I=drift(model, tok, held_out, ref))
            undo(model, e_i)
            out.append(row)
        return out

    if not cache:
        return make()
    c_hash = hashlib.sha256(C.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
    config = dict(recs=list(recs), layer=layer, C=c_hash, prefixes=list(prefixes), held_out=list(held_out),
                  damping=damping, steps=steps)
    return course_cache.json("rome/edits", config, make, weights=model)


LOCALITY_MARGIN = 0.1   # an edit is local when the share of neighbours keeping their object drops by less


def edit_effects(before: Sequence[dict], after: Sequence[dict], method: str = "ROME") -> list:
    """C15's three tests of an editing method, thresholds fixed before any run, per edit (paired):
    reliability = efficacy margin > 0, generality = paraphrase margin > 0, locality = the share of
    neighbours that keep their true object drops by less than :data:`LOCALITY_MARGIN`
    (after - before > -0.1). ``before`` / ``after``: :func:`edit_scores` rows of the same edits."""
    import numpy as np

    from .evidence import effect

    col = lambda rows, k: np.array([r[k] for r in rows], dtype=float)
    return [effect(f"{method} efficacy margin", col(after, "efficacy_margin"), "greater"),
            effect(f"{method} paraphrase margin", col(after, "paraphrase_margin"), "greater"),
            effect(f"{method} neighbourhood share, after - before", col(after, "neighbourhood") - col(before, "neighbourhood"),
                   "greater", null=-LOCALITY_MARGIN)]


def finetune_edit(model, tok, rec: dict, params: str = "all", layer: int | None = None, lr: float = 5e-5,
                  max_steps: int = 30, until: float = 0.0) -> dict:
    """The baseline: make the same edit by gradient descent (Adam, batch = the one sentence
    ``prompt + target_new``) on ``params`` = "all" (full fine-tuning) or "down_proj" (ROME's matrix at
    ``layer`` only), with an early stop once the edit holds at least as firmly as ``until``: the
    efficacy margin log P(new) - log P(true) on the prompt >= ``until`` (pass ROME's margin on the same
    edit to compare at matched efficacy). Edits ``model`` in place; returns steps, margin and seconds."""
    import torch

    if params not in ("all", "down_proj"):
        raise CourseError(f"finetune_edit(): params must be 'all' or 'down_proj' (got {params!r})")
    if max_steps < 1 or lr <= 0:
        raise CourseError(f"finetune_edit() needs max_steps >= 1 and lr > 0 (got {max_steps}, {lr})")
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    if params == "all":
        train = [p for p in model.parameters()]
    else:
        if layer is None:
            raise CourseError("finetune_edit(params='down_proj') needs the layer")
        train = [_down_proj(model, layer).weight]
    p_ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    tgt = [tok(rec[k], add_special_tokens=False)["input_ids"] for k in ("target_new", "target_true")]
    ids, att = pad_right(tok, [p_ids + t for t in tgt])
    ids, att = ids.to(dev), att.to(dev)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr)
    was_training = model.training
    model.eval()   # no dropout: the edit is one sentence, deterministic
    step, margin = 0, float("nan")
    try:
        for step in range(max_steps + 1):
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
            lp = [torch.stack([logp[r, len(p_ids) - 1 + j, t] for j, t in enumerate(tgt[r])]).mean() for r in (0, 1)]
            margin = float((lp[0] - lp[1]).detach())
            if margin >= until or step == max_steps:
                break
            opt.zero_grad(set_to_none=True)
            (-lp[0]).backward()
            opt.step()
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return dict(steps=step, margin=margin, seconds=time.perf_counter() - t0)


def sequential_edits(model, tok, recs: Sequence[dict], layer: int, C, prefixes: Sequence[str],
                     checkpoints: Sequence[int] = (), damping: float = 0.0, progress: bool = True, **v_kwargs) -> list[dict]:
    """Apply ``recs`` one after another *without* restoring (k*, v* recomputed on the current, already
    edited model). After edit t for t in ``checkpoints`` (default: every edit) score edits 1..t with
    :func:`edit_scores`: one row per checkpoint with ``n_edits`` and, per score, the mean and the per-edit
    values (``rows``). Weights are left edited: restore afterwards."""
    from tqdm.auto import tqdm

    marks = set(checkpoints) if checkpoints else set(range(1, len(recs) + 1))
    out = []
    for t, rec in enumerate(tqdm(list(recs), desc="sequential edits", disable=not progress, leave=False), 1):
        apply_rome(model, tok, rec, layer, C, prefixes, damping, **v_kwargs)
        if t in marks:
            rows = [edit_scores(model, tok, r) for r in recs[:t]]
            out.append(dict(n_edits=t, rows=rows, **mean_scores(rows)))
    return out
