"""cpuattn inside a Hugging Face transformers model: register, generate, fine-tune one step.

    python examples/transformers_cpuattn.py                  # a small random Llama (no download)
    python examples/transformers_cpuattn.py --model PATH     # a local checkpoint of a causal LM

Needs torch and transformers. The same model runs with attn_implementation="sdpa" (torch's
own) and "cpuattn"; greedy generation must give the same tokens, and a training step's loss
the same value. Everything but attention is torch's code either way.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import cpuattn.torch


def small_random_llama(seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: cpuattn reads the 2 kv heads in place
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def generate(model, prompt, new_tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        tokens = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return tokens[:, prompt.shape[1] :], time.perf_counter() - t0


def training_step(model, batch) -> float:
    """One AdamW step on next-token prediction; returns the loss before it."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = model(batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return loss.item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local checkpoint (default: a small random Llama)")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    name = cpuattn.torch.register_transformers()  # attn_implementation="cpuattn"
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, attn_implementation=name
        )
    else:
        model = small_random_llama()
    model.eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(
        0, vocab, (1, args.prompt_length), generator=torch.Generator().manual_seed(1)
    )

    results = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        tokens, seconds = generate(model, prompt, args.new_tokens)
        results[impl] = {"tokens": tokens, "seconds": seconds}
        print(f"{impl:8s} generate: {args.new_tokens} tokens in {seconds:.2f} s")
    same = torch.equal(results["sdpa"]["tokens"], results[name]["tokens"])
    print(f"same tokens with sdpa and {name}: {same}")

    model.set_attn_implementation(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = training_step(model, prompt[:, :256])
    model.load_state_dict(state)
    model.set_attn_implementation("sdpa")
    reference = training_step(model, prompt[:, :256])
    print(f"training step loss: {name} {loss:.6f}, sdpa {reference:.6f}")
    return {"same_tokens": same, "loss": loss, "loss_sdpa": reference}


if __name__ == "__main__":
    main()
