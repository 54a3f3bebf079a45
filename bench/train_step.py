"""Time and peak memory of one train.py step: full fine-tuning against LoRA, at a real student's shape.

    python -m bench.train_step --device cuda                              # Qwen2.5-0.5B shape, bf16 autocast
    python -m bench.train_step --device cpu --model_size 11m --threads 1  # the script itself, on a CPU

A step is what train.py does for a window of one micro-batch: forward and backward of its loss
(CE + option-level KD + token-level KD through `atkd.head.HeadAtPositions`, `micro_batch_loss`)
on --batch_size sequences of --prompt_len + --response_len tokens (random ids and teacher
targets, 152k vocabulary at 0.5b), gradient clipping, then AdamW's step. Weights and AdamW state
are fp32 (train.py's master weights); on CUDA the compute runs under bf16 autocast, as train.py
runs it there. Two variants, each in a fresh process:

  full   every weight trains: weights, gradients and AdamW's two moments, 16 bytes/parameter
  lora   LoRA adapters (`atkd.lora`, rank --lora_r on every linear layer but the head) train,
         the base is frozen: no gradients or AdamW state for it

Measured: the median time of --steps steps after --warmup (CUDA synchronised), and the peak
memory of the whole run (CUDA: torch.cuda.max_memory_allocated, weights included; CPU: the peak
resident set). Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>
RESULTS = ROOT / "bench" / "results" / "train_step.json"
VARIANTS = ("full", "lora")
GIB = 1024 ** 3


def build_parser() -> argparse.ArgumentParser:
    from bench.scoring import SIZES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model_size", default="0.5b", choices=sorted(SIZES))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--response_len", type=int, default=32)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernels, allocator, AdamW state)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: measure one variant
    return p


# --------------------------------------------------------------------------- one variant (child process)

def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from atkd import lora
    from atkd.head import HeadAtPositions
    from atkd.train_data import token_counts
    from atkd.trainer import TrainConfig, micro_batch_loss
    from bench.scoring import SIZES
    from bench.train_memory import synthetic_batch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    shape = SIZES[args.model_size]
    config = Qwen2Config(**shape, max_position_embeddings=args.prompt_len + args.response_len + 8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()  # fp32 master weights, as train.py loads them
    model.config.use_cache = False
    if args.variant == "lora":
        lora.add_adapters(model, lora.lora_config(args.lora_r, 2.0 * args.lora_r, 0.0, [lora.ALL_LINEAR]))
    model.to(device).train()
    head = HeadAtPositions(model, shape["vocab_size"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    args.vocab = shape["vocab_size"]
    batch = synthetic_batch(args, device)
    cfg = TrainConfig(student_model_path="s", train_file_path="t", teacher_logits_dir="l", output_dir="o")
    n_ce, n_kd = token_counts(batch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step() -> float:
        if autocast is not None:
            with autocast:
                loss, _, _ = micro_batch_loss(head, batch, n_ce, n_kd, cfg)
        else:
            loss, _, _ = micro_batch_loss(head, batch, n_ce, n_kd, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
    return {"variant": args.variant, "step_seconds": statistics.median(times), "all_step_seconds": times,
            "peak_bytes": peak, "loss": loss, "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in trainable),
            "peak_method": "torch.cuda.max_memory_allocated (bf16 autocast, fp32 weights)" if device.type == "cuda"
            else "peak resident set (VmHWM), fp32"}


# --------------------------------------------------------------------------- the table (parent process)

def main(argv=None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.variant:
        print(json.dumps(measure(args)))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = {}
    for variant in VARIANTS:
        res = subprocess.run([sys.executable, "-m", "bench.train_step", *passthrough, "--variant", variant],
                             capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        rows[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    setup = {k: getattr(args, k) for k in ("device", "model_size", "batch_size", "prompt_len", "response_len",
                                           "top_k", "lora_r", "steps", "warmup")}
    setup["device_name"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"setup: {setup}; {rows['full']['params'] / 1e6:.1f}M parameters; {rows['full']['peak_method']}")
    print(f"{'variant':<8} {'trainable':>12} {'step (s)':>9} {'tokens/s':>10} {'peak (GiB)':>11}")
    tokens = args.batch_size * (args.prompt_len + args.response_len)
    for v in VARIANTS:
        r = rows[v]
        print(f"{v:<8} {r['trainable_params'] / 1e6:>11.2f}M {r['step_seconds']:>9.3f} "
              f"{tokens / r['step_seconds']:>10.0f} {r['peak_bytes'] / GIB:>11.2f}")
    ratios = {"lora_over_full_time": rows["lora"]["step_seconds"] / rows["full"]["step_seconds"],
              "lora_over_full_peak": rows["lora"]["peak_bytes"] / rows["full"]["peak_bytes"]}
    print(f"lora / full: time {ratios['lora_over_full_time']:.2f}x, peak memory {ratios['lora_over_full_peak']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"setup": setup, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
