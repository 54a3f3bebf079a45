"""Score-mode throughput of inference.py against the reference's per-item `generate`, in one run.

    python -m bench.scoring --device cpu --model_size 11m

Both sides answer the same questions with the same randomly initialised Qwen2-style model:
- ours: `atkd.answering.plan_batches` + `answer_local` in score mode, exactly what inference.py's
  workers run (length-sorted left-padded batches, one forward pass each, logits at the last
  position only);
- the reference's approach: one `model.generate` per item of the letter prompt, 8 new tokens,
  then a letter read from the text.
The prompts are real: synthetic questions rendered through the MCQ prompt and a chat template, tokenized
by a byte-level BPE trained here on a synthetic corpus, each about --prompt_tokens tokens long. The
`0.5b` size has Qwen2.5-0.5B's shape (its 151,936-row vocabulary included; the prompts use the
tokenizer's first rows, which costs the same). Prints a table and writes bench/results/scoring.json.

Also: score mode's achieved TFLOP/s (the forward's useful FLOPs: 2 x the decoder's linear weights
x the real prompt tokens, causal attention 2 x T^2 x width per layer, the head at the last position
only; padding not counted) as a share of the FLOP limit: the throughput of a large matrix product
in the compute dtype, measured in the same run (`--limit_matmul`; bf16 8192^3 on a GPU), and of the
device's datasheet dense peak where it is known (`--peak_tflops` overrides it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>

import torch

from atkd.answering import Answerer, answer_local, plan_batches
from atkd.letters import extract_letter
from atkd.models import resolve_dtype
from atkd.prompts import answer_line, encode_prompt, mcq_prompt, mcq_user_text
from atkd.records import Question
from atkd.tiny import train_tokenizer

RESULTS = ROOT / "bench" / "results" / "scoring.json"
REFERENCE_NEW_TOKENS = 8  # what the reference generates per item to read one letter

# Qwen2-style shapes (grouped-query attention, tied embeddings). 11m: 10.4M parameters with a 32k
# vocabulary (Llama-2/Mistral size); 0.5b: Qwen2.5-0.5B exactly (494M). On a CPU the ratio depends
# on the width: the batched forward is compute-bound, the reference's 7 decode steps mostly are not,
# so a wider 11M model (hidden 256, 7 layers, 16k vocabulary) measures ~2.7x instead of ~3.7x.
SIZES = {
    "11m": dict(vocab_size=32000, hidden_size=192, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True),
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
}
TOKENIZER_VOCAB = 16384
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}  # dense bf16


# --------------------------------------------------------------------------- FLOPs

def forward_flops(model, lengths: list[int]) -> float:
    """Useful FLOPs of score mode's forward passes over prompts of `lengths` real tokens."""
    cfg = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2)
    width = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) \
        else cfg.hidden_size
    per_item = [2 * linear * t + 2 * cfg.num_hidden_layers * t * t * width + 2 * cfg.hidden_size * cfg.vocab_size
                for t in lengths]
    return float(sum(per_item))


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Throughput of an n x n x n matrix product in `dtype` (the practical FLOP limit of this device)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds / 1e12


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)


# --------------------------------------------------------------------------- synthetic text

def lexicon(n_words: int, rng: random.Random) -> list[str]:
    """Pronounceable pseudo-words of 1-4 syllables: enough distinct words that BPE learns sub-words."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
              "br", "ch", "cl", "dr", "gl", "pr", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
    codas = ["", "", "n", "r", "s", "l", "x", "m", "st", "nd"]
    words: set[str] = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    return sorted(words)


class TextSource:
    """Zipf-distributed words from a fixed lexicon (a natural language's word frequencies)."""

    def __init__(self, seed: int = 0, n_words: int = 20000):
        self.rng = random.Random(seed)
        self.words = lexicon(n_words, self.rng)
        self.rng.shuffle(self.words)  # frequency rank must not follow the alphabet
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]

    def sample(self, n: int) -> list[str]:
        return self.rng.choices(self.words, weights=self.weights, k=n)

    def sentence(self, lo: int = 6, hi: int = 18) -> str:
        return " ".join(self.sample(self.rng.randint(lo, hi))).capitalize() + "."


def build_tokenizer(source: TextSource, n_sentences: int = 20000, n_prompts: int = 500):
    """A byte-level BPE trained on the corpus and on MCQ prompt text (so the template's words are tokens too)."""
    texts = [source.sentence() for _ in range(n_sentences)]
    for i in range(n_prompts):
        options = {L: " ".join(source.sample(source.rng.randint(2, 5))) for L in "ABCD"}
        q = Question(id=i, question=source.sentence(), options=options, answer_idx="A")
        texts.append(mcq_user_text(q, "en") + "\n" + answer_line("A", "en"))
    return train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB, style="bytelevel", chat=True)


def make_question(tokenizer, source: TextSource, qid: int, prompt_tokens: int, lang: str = "en") -> Question:
    """A four-option question whose rendered MCQ prompt is as close to `prompt_tokens` as words allow."""
    letters = "ABCD"
    options = {L: " ".join(source.sample(source.rng.randint(2, 5))) for L in letters}
    answer = source.rng.choice(letters)
    stream = source.sample(2 * prompt_tokens)

    def question(k: int) -> Question:
        return Question(id=qid, question=" ".join(stream[:k]).capitalize() + "?", options=options,
                        answer_idx=answer)

    lo, hi = 1, len(stream)  # largest word count whose prompt fits in prompt_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode_prompt(tokenizer, mcq_prompt(tokenizer, question(mid), lang))) <= prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return question(lo)


# --------------------------------------------------------------------------- the two methods

def build_model(size: str, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(SIZES[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen2Config(**shape, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, tokenizer, questions: list[Question], batch_size: int) -> list[dict]:
    """inference.py's score mode: plan the batches, one forward pass per batch."""
    who = Answerer(model_path="<in memory>", mode="score", lang="en")
    replies: list[dict] = []
    for batch in plan_batches(who, questions, batch_size, tokenizer):
        replies += answer_local(model, tokenizer, [questions[i] for i in batch], who)
    return replies


@torch.no_grad()
def run_reference(model, tokenizer, questions: list[Question]) -> list[str | None]:
    """The reference's approach: per item, generate 8 tokens after the letter prompt and read a letter."""
    device = model.get_input_embeddings().weight.device
    letters = []
    for q in questions:
        ids = torch.tensor([encode_prompt(tokenizer, mcq_prompt(tokenizer, q, "en"))], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=REFERENCE_NEW_TOKENS,
                             min_new_tokens=REFERENCE_NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        letters.append(extract_letter(text, q.letters, q.options))
    return letters


def load_average() -> float:
    """The machine's 1-minute load: other processes on a shared CPU change both methods' speed."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model_size", default="11m", choices=sorted(SIZES))
    p.add_argument("--n_items", type=int, default=128, help="questions answered by each method")
    p.add_argument("--batch_size", type=int, default=32, help="score-mode batch size")
    p.add_argument("--prompt_tokens", type=int, default=150, help="target prompt length in tokens")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto = bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--limit_matmul", type=int, default=0,
                   help="size n of the n^3 matrix product that measures the FLOP limit (0: 8192 on cuda, 1024 on cpu)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the device's datasheet dense peak in TFLOP/s (0: from a table of known GPUs, else none)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    dtype = resolve_dtype(args.dtype, device)

    source = TextSource(args.seed)
    tokenizer = build_tokenizer(source)
    questions = [make_question(tokenizer, source, i, args.prompt_tokens) for i in range(args.n_items)]
    lengths = [len(encode_prompt(tokenizer, mcq_prompt(tokenizer, q, "en"))) for q in questions]
    model = build_model(args.model_size, tokenizer, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    # Warm-up (kernels, allocator, generate's first-call setup) outside the timed runs.
    run_ours(model, tokenizer, questions[: args.batch_size], args.batch_size)
    run_reference(model, tokenizer, questions[:2])

    # Interleaved rounds of one batch each: on a shared machine both methods then see the same load.
    ours_s = ref_s = 0.0
    for start in range(0, len(questions), args.batch_size):
        chunk = questions[start:start + args.batch_size]
        ours_s += timed(lambda: run_ours(model, tokenizer, chunk, args.batch_size), device)
        ref_s += timed(lambda: run_reference(model, tokenizer, chunk), device)
    ours_ips, ref_ips = len(questions) / ours_s, len(questions) / ref_s
    ratio = ours_ips / ref_ips
    achieved = forward_flops(model, lengths) / ours_s / 1e12
    limit = matmul_tflops(device, dtype, args.limit_matmul or (8192 if device.type == "cuda" else 1024))
    sheet = args.peak_tflops or datasheet_tflops(device)

    rows = [(f"inference.py score mode (batch {args.batch_size})", ours_s, ours_ips),
            (f"reference: per-item generate ({REFERENCE_NEW_TOKENS} new tokens)", ref_s, ref_ips)]
    print(f"model {args.model_size} ({n_params / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}) on "
          f"{args.device}, {len(questions)} items, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"torch threads {torch.get_num_threads()}, load average {load_average():.1f}")
    print(f"{'method':<48} {'seconds':>9} {'items/s':>9}")
    for name, s, ips in rows:
        print(f"{name:<48} {s:>9.2f} {ips:>9.2f}")
    print(f"ratio (ours / reference): {ratio:.2f}x")
    print(f"score mode: {achieved:.2f} TFLOP/s = {achieved / limit:.1%} of the measured {dtype_name(dtype)} "
          f"matrix-product limit ({limit:.2f} TFLOP/s)"
          + (f", {achieved / sheet:.1%} of the datasheet peak ({sheet:.0f} TFLOP/s)" if sheet else ""))

    import transformers
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "model_size": args.model_size, "parameters": n_params, "dtype": str(dtype).replace("torch.", ""),
        "n_items": len(questions), "batch_size": args.batch_size, "prompt_tokens_target": args.prompt_tokens,
        "prompt_tokens_mean": sum(lengths) / len(lengths), "reference_new_tokens": REFERENCE_NEW_TOKENS,
        "torch_threads": torch.get_num_threads(), "load_average_1min": load_average(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "ours": {"seconds": ours_s, "items_per_s": ours_ips},
        "reference": {"seconds": ref_s, "items_per_s": ref_ips},
        "ratio": ratio,
        "achieved_tflops": achieved, "limit_matmul_tflops": limit, "share_of_limit": achieved / limit,
        "datasheet_tflops": sheet, "share_of_datasheet": achieved / sheet if sheet else None,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
