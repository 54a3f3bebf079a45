"""Peak memory of one distillation training step: head at response positions vs full-sequence logits.

    python -m bench.train_memory                      # CPU: peak RSS increase of the step
    python -m bench.train_memory --device cuda        # GPU: torch.cuda.max_memory_allocated increase

One forward + backward of a randomly initialised Llama-style student with a 32k vocabulary on
`--batch_size` sequences of a 512-token prompt and a 32-token response, four ways, each in a fresh
process (so one variant's allocator high-water mark cannot hide another's):

  kd          what train.py does: the body, then the head at the 32 response positions only;
              CE + option-level KD + token-level KD (top-20 + tail) on those rows
  ce_only     the same head-at-response-positions path with the CE term only (the baseline)
  naive_kd    KD as the reference wrote it: `model(..., labels=...)` (full-sequence logits and
              CE), then log_softmax(logits / T) over the whole sequence, then the same KD terms
              on the response rows
  full_sliced the most frugal naive variant: full-sequence logits, sliced to the response rows
              before any softmax, then train.py's loss
  hf_ce       plain `model(input_ids, labels=...)` CE: what a usual SFT step costs

Measured: CPU, the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the model and batch exist and after malloc_trim) over the RSS before
the step; CUDA, torch.cuda.max_memory_allocated() after the step minus memory_allocated() before
it (bf16 autocast, as train.py runs on GPU). Both include the gradient buffers (the same size in
every variant); the optimizer step is not included. Targets: kd <= 1.1 x ce_only, <= 0.5 x naive_kd.
The naive variants' share grows with the vocabulary and shrinks with the body's activations per
token (more layers / width); --gradient_checkpointing shrinks the body's share.
Writes bench/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>

VARIANTS = ("ce_only", "kd", "naive_kd", "full_sliced", "hf_ce")
GIB = 1024 ** 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--response_len", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute the body's activations")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per variant, run round-robin; the table shows each variant's median "
                        "(CPU peak RSS moves by ~10%% from run to run with the allocator's luck)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: measure one variant
    return p


# --------------------------------------------------------------------------- one variant (child process)

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is live
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _rss_bytes("VmRSS")


def _model(args, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, intermediate_size=args.hidden * 11 // 4,
                      max_position_embeddings=args.prompt_len + args.response_len + 8, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def synthetic_batch(args, device):
    """A collated micro-batch of random sequences with teacher targets (args: vocab, prompt_len, response_len,
    batch_size, top_k), as train.py builds them."""
    import torch

    from atkd.train_data import TrainExample, collate

    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(args.batch_size):
        ids = torch.randint(3, args.vocab, (args.prompt_len + args.response_len,), generator=g).tolist()
        opts = [10 + i * 4 + j for j in range(4)]
        response = [opts[i % 4]] + ids[args.prompt_len + 1:]
        n = len(response) - 1
        full = torch.log_softmax(torch.randn(n, args.vocab, generator=g), -1)
        top = full.topk(args.top_k, -1)
        examples.append(TrainExample(
            key=str(i), prompt_ids=ids[:args.prompt_len], response_ids=response, option_ids=opts,
            teacher_option_logp=torch.log_softmax(torch.randn(4, generator=g), -1), topk_ids=top.indices,
            topk_logp=top.values, tail_logp=torch.logsumexp(full.scatter(-1, top.indices, float("-inf")), -1)))
    batch = collate(examples, [1.0] * len(examples), pad_id=0)
    return {k: v.to(device) for k, v in batch.items()}


class _FullLogitsThenGather:
    """The model's full B x L x V logits, then the response rows (train.py's loss afterwards)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask, position_ids, rows, cols):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        return logits[rows, cols]


def _labels(batch):
    """HF-style labels: the response tokens, -100 elsewhere (HF shifts them itself; the last response
    token is not in the input, so its label is dropped: one token of 32)."""
    import torch

    labels = torch.full_like(batch["input_ids"], -100)
    rows, cols = batch["rows"], batch["cols"] + 1
    keep = cols < labels.shape[1]
    labels[rows[keep], cols[keep]] = batch["targets"][keep]
    return labels


def _step(variant: str, model, batch):
    import torch

    from atkd.head import HeadAtPositions
    from atkd.kd_loss import ce_sum, option_kd, token_kd
    from atkd.train_data import token_counts
    from atkd.trainer import TrainConfig, micro_batch_loss

    cfg = TrainConfig(student_model_path="s", train_file_path="t", teacher_logits_dir="l", output_dir="o",
                      temperature=2.0, alpha_ce=0.5, kd_loss="forward_kl")
    n_ce, n_kd = token_counts(batch)
    if variant == "kd":
        loss, _, _ = micro_batch_loss(HeadAtPositions(model, model.config.vocab_size), batch, n_ce, n_kd, cfg)
    elif variant == "full_sliced":
        loss, _, _ = micro_batch_loss(_FullLogitsThenGather(model), batch, n_ce, n_kd, cfg)
    elif variant == "naive_kd":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], labels=_labels(batch), use_cache=False)
        T = cfg.temperature
        soft = torch.log_softmax(out.logits.float() / T, dim=-1)  # B x L x V: the naive part
        picked = soft[batch["rows"], batch["cols"]]
        kd = (option_kd(picked[batch["opt_index"]].gather(-1, batch["opt_ids"]), batch["opt_teacher"] / T,
                        batch["opt_mask"], 1.0, cfg.kd_loss)).sum()
        kd = kd + token_kd(picked[batch["tok_index"]], batch["tok_ids"], batch["tok_logp"], batch["tok_tail"], 1.0,
                           cfg.kd_loss).sum()
        loss = cfg.alpha_ce * out.loss + (1 - cfg.alpha_ce) * T ** 2 * kd / n_kd
    elif variant == "ce_only":
        head = HeadAtPositions(model, model.config.vocab_size)
        logits = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["rows"], batch["cols"])
        loss = ce_sum(logits.float(), batch["targets"], batch["weights"]) / n_ce
    else:  # hf_ce
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=_labels(batch), use_cache=False).loss
    loss.backward()
    return float(loss.detach())


def measure(args) -> dict:
    import torch

    device = torch.device(args.device)
    model = _model(args, device)
    batch = synthetic_batch(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _step(args.variant, model, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        how = "torch.cuda.max_memory_allocated - memory_allocated before (bf16 autocast)"
    else:
        before = _reset_cpu_peak()
        loss = _step(args.variant, model, batch)
        peak = _rss_bytes("VmHWM") - before
        how = "peak RSS (VmHWM after clear_refs) - RSS before, fp32"
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"variant": args.variant, "peak_bytes": peak, "grad_bytes": grads, "loss": loss, "method": how,
            "params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- the table (parent process)

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return 0
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for _ in range(max(1, args.repeats)):
        for variant in VARIANTS:  # round-robin, so a drifting machine affects every variant alike
            res = subprocess.run([sys.executable, "-m", "bench.train_memory", *passthrough, "--variant", variant],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            samples[variant].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = {}
    for variant, runs in samples.items():
        runs = sorted(runs, key=lambda r: r["peak_bytes"])
        rows[variant] = {**runs[len(runs) // 2], "peak_bytes_all": [r["peak_bytes"] for r in runs]}
    base, kd, naive = rows["ce_only"]["peak_bytes"], rows["kd"]["peak_bytes"], rows["naive_kd"]["peak_bytes"]
    ratios = {"kd_over_ce_only": kd / base, "kd_over_naive_kd": kd / naive,
              "kd_over_full_sliced": kd / rows["full_sliced"]["peak_bytes"]}
    setup = {k: getattr(args, k) for k in ("device", "vocab", "prompt_len", "response_len", "batch_size", "hidden",
                                           "layers", "top_k", "gradient_checkpointing", "repeats")}
    print(f"setup: {setup}; {rows['kd']['params'] / 1e6:.1f}M parameters; {rows['kd']['method']}")
    print(f"{'variant':<12} {'peak (GiB)':>11} {'of which grads':>15} {'x ce_only':>10}   every run (GiB)")
    for v in VARIANTS:
        r = rows[v]
        every = " ".join(f"{b / GIB:.3f}" for b in r["peak_bytes_all"])
        print(f"{v:<12} {r['peak_bytes'] / GIB:>11.3f} {r['grad_bytes'] / GIB:>15.3f} {r['peak_bytes'] / base:>10.2f}"
              f"   {every}")
    ok_ce, ok_naive = ratios["kd_over_ce_only"] <= 1.1, ratios["kd_over_naive_kd"] <= 0.5
    print(f"kd / ce_only = {ratios['kd_over_ce_only']:.3f} (target <= 1.1: {'met' if ok_ce else 'MISSED'}); "
          f"kd / naive_kd = {ratios['kd_over_naive_kd']:.3f} (target <= 0.5: {'met' if ok_naive else 'MISSED'}); "
          f"kd / full_sliced = {ratios['kd_over_full_sliced']:.3f}")
    out = ROOT / "bench" / "results" / "train_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "rows": rows, "ratios": ratios,
                               "targets_met": {"kd_le_1.1x_ce_only": ok_ce, "kd_le_0.5x_naive": ok_naive}}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
