"""Shared fixtures: a tiny randomly initialised Llama with SmolLM2's real tokenizer (seconds, no model file)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("COURSEKIT_PROFILE", "ci")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


def make_tiny_llama(tok, seed: int = 0, layers: int = 2, hidden: int = 32, inter: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def tiny(tok):
    """(model, tokenizer): a fresh 2-layer Llama (hidden 32) for every test."""
    return make_tiny_llama(tok), tok


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
