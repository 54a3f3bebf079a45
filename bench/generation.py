"""Batched generation (one left-padded generate call for 16 prompts) against one prompt at a time.

    python -m bench.generation                                   # ~11M-parameter Llama on the CPU
    python -m bench.generation --device cuda --model_size 0.5b   # Qwen2.5-0.5B-shaped model on a GPU

This is why generate_distill_data.py and the generate-mode agents take --batch_size: the same
model, the same prompts (question-writing length, 160-320 tokens), the same sampling settings as
the stage (temperature 0.8, top-p 0.95); every row generates exactly --new_tokens tokens, so the
two runs do the same work. Prompt processing is included: it is part of what a stage waits for, and
it gains little from batching, so short replies show a smaller ratio than long ones. Weights are random (speed does not depend on them). Prints a table and
writes bench/results/generation.json; the baseline (one at a time) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>

from atkd.batching import left_pad
from atkd.models import DTYPES

SIZES = {
    # ~11M parameters: an 8k vocabulary and 8 layers of width 256.
    "11m": dict(family="llama", vocab_size=8000, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, intermediate_size=768, tie_word_embeddings=False),
    # The shape of Qwen2.5-0.5B-Instruct (494M parameters, grouped-query attention, tied embeddings).
    "0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
}
PAD_ID, EOS_ID = 0, 1


def build(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(SIZES[size])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape.pop("family")]
    config = cls(max_position_embeddings=4096, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=2, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype=dtype, device=device).eval()
    return model


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 160-320 random tokens (a question-writing prompt with three examples)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(160, 320))] for _ in range(n)]


@torch.no_grad()
def generate(model, batch: list[list[int]], new_tokens: int, seed: int) -> int:
    """One left-padded sampled generate call (as atkd.generation.generate_batch); returns tokens made."""
    torch.manual_seed(seed)
    inputs = left_pad(batch, PAD_ID, device=model.device)
    inputs.pop("position_ids")
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                         temperature=0.8, top_p=0.95, top_k=0, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]


def timed(device: torch.device, fn) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--model_size", default="11m", choices=sorted(SIZES))
    p.add_argument("--new_tokens", type=int, default=128,
                   help="tokens generated per prompt (a written question with options is ~100-250)")
    p.add_argument("--batch", type=int, default=16, help="prompts in the batched call")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 on a machine shared with other jobs, where "
                        "several threads spin-wait at every small op and distort the one-at-a-time baseline)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build(args.model_size, device, dtype)
    params = sum(t.numel() for t in model.parameters())
    batch = prompts(args.batch, model.config.vocab_size)

    generate(model, batch[:2], 4, seed=0)  # warm-up: kernels, allocator, caches
    generate(model, batch[:1], 4, seed=0)
    single_s, single_tokens = timed(device, lambda: sum(generate(model, [b], args.new_tokens, seed=i)
                                                        for i, b in enumerate(batch)))
    batched_s, batched_tokens = timed(device, lambda: generate(model, batch, args.new_tokens, seed=0))
    assert single_tokens == batched_tokens == args.batch * args.new_tokens

    single_tps, batched_tps = single_tokens / single_s, batched_tokens / batched_s
    result = {
        "bench": "generation", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "model_size": args.model_size, "parameters": params,
        "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "new_tokens": args.new_tokens,
        "prompt_tokens": [len(b) for b in batch],
        "one_at_a_time": {"seconds": round(single_s, 3), "tokens_per_s": round(single_tps, 1)},
        "batched": {"seconds": round(batched_s, 3), "tokens_per_s": round(batched_tps, 1)},
        "ratio": round(batched_tps / single_tps, 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    print(f"model {args.model_size} ({params / 1e6:.1f}M params, {result['dtype']}) on {device} "
          f"({result['torch_threads']} threads), {args.batch} prompts x {args.new_tokens} new tokens")
    print(f"{'mode':<16}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'one at a time':<16}{single_s:>10.2f}{single_tps:>12.1f}")
    print(f"{'batch of ' + str(args.batch):<16}{batched_s:>10.2f}{batched_tps:>12.1f}")
    print(f"ratio (batched / one at a time): {result['ratio']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
