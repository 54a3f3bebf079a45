"""Step E through llama.cpp against the local step E, the demo's trained teacher, the real stage, one run.

    python -m bench.served_step_e --n_items 200

Serves the demo teacher (data/demo/models/teacher, converted to an f32 GGUF by llama.cpp's own
converter with GPT-2's pre-tokenizer: tests/served_llama.py) with `python -m llama_cpp.server` (one
thread, as on a 2-core machine), then runs `atkd.teacher_logits.run` on the same rationale items
(the demo's questions, each with a one-sentence reason: option- and token-level targets):
- locally (transformers, fp32, batch 16, one torch thread), the baseline;
- served, with the top-k cap at 20 (hosted APIs' limit) and at 5 (what a lower cap does to the tail);
and compares the stores: letter argmax agreement, the largest |log-prob difference| of the letters
(those with probability above 1e-3, and all), items with a letter outside the returned top-k,
token-level top-k overlap and the largest difference on shared ids, the mass the cap leaves outside.
items/s counts the whole stage (requests, alignment, shards), model loading included.
Prints a table and writes bench/results/served_step_e.json. Needs llama-cpp-python[server] and the
llama-cpp-python source distribution (tests/served_llama.py says where it looks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>
sys.path.insert(0, str(ROOT / "tests"))

import torch

from atkd.io import write_jsonl
from atkd.logits_store import LogitsStore
from atkd.teacher_logits import LogitsConfig, run

RESULTS = ROOT / "bench" / "results" / "served_step_e.json"
DEMO = ROOT / "data" / "demo"


def rationale_items(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in (DEMO / "iteration_1.jsonl").read_text().splitlines()[:n]]
    for r in rows:
        r["explanation"] = f"{r['options'][r['answer_idx']]} is the one that fits."
    write_jsonl(path, rows)
    return path


def timed(cfg: LogitsConfig) -> float:
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def compare(served: LogitsStore, local: LogitsStore) -> dict:
    agree, worst_likely, worst_all, overlaps, worst_token = 0, 0.0, 0.0, [], 0.0
    for key in local.items:
        a, b = served.option_logprobs(key), local.option_logprobs(key)
        agree += int(a.argmax() == b.argmax())
        likely = b > math.log(1e-3)
        worst_likely = max(worst_likely, (a - b)[likely].abs().max().item())
        worst_all = max(worst_all, (a - b).abs().max().item())
        ta, tb = served.token_level(key), local.token_level(key)
        if ta is None or tb is None:
            continue
        for row_a, lp_a, row_b, lp_b in zip(ta[1], ta[2], tb[1], tb[2]):
            k = len(row_a)
            overlaps.append(len(set(row_a.tolist()) & set(row_b[:k].tolist())) / k)
            mine = dict(zip(row_a.tolist(), lp_a.tolist()))
            worst_token = max([worst_token] + [abs(mine[i] - v) for i, v in zip(row_b.tolist(), lp_b.tolist())
                                               if i in mine and v > math.log(1e-3)])
    summary = served.index["summary"]
    return {"letter_argmax_agreement": agree / len(local.items), "max_letter_diff_p_above_1e-3": worst_likely,
            "max_letter_diff_all": worst_all, "token_topk_overlap": sum(overlaps) / max(1, len(overlaps)),
            "max_token_diff_p_above_1e-3": worst_token,
            "items_with_letters_outside_top_k": summary["served"]["items_with_letters_outside_top_k"],
            "mean_mass_outside_top_k_at_answer": 1 - summary["served"]["mean_top_k_mass"],
            "token_level_items": summary["token_level_items"]}


def token_tail(store: LogitsStore) -> float:
    """Mean mass outside the stored top-k over the token-level rows."""
    tails = [torch.exp(store.token_level(k)[3]).mean().item() for k in store.items if store.token_level(k)]
    return sum(tails) / max(1, len(tails))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_items", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (llama-cpp-python answers "
                                                                    "one at a time)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from served_llama import convert_to_gguf, gpt2_byte_level, llama_cpp_missing, llama_cpp_server

    reason = llama_cpp_missing()
    if reason:
        print(f"skipped: {reason}")
        return 1
    teacher = DEMO / "models" / "teacher"
    assert gpt2_byte_level(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = rationale_items(tmp / "items.jsonl", args.n_items)
        gguf = convert_to_gguf(teacher, tmp / "teacher.gguf", tmp, pre="gpt-2")
        common = dict(dataset_path=str(data), response_field="explanation", batch_size=16)
        rows, stores = {}, {}
        seconds = timed(LogitsConfig(model_path=str(teacher), output_dir=str(tmp / "local"), **common))
        rows["local (transformers, fp32)"] = seconds
        stores["local"] = LogitsStore.open(tmp / "local")
        with llama_cpp_server(gguf, teacher, tmp, alias="teacher") as server:
            for cap in (20, 5):
                name = f"served (llama.cpp, top {cap})"
                rows[name] = timed(LogitsConfig(model_path=str(teacher), api_base=server.base, api_model=server.model,
                                                api_concurrency=args.concurrency, top_logprobs_cap=cap,
                                                output_dir=str(tmp / f"served{cap}"), **common))
                stores[cap] = LogitsStore.open(tmp / f"served{cap}")
        n = args.n_items
        print(f"step E on {n} demo rationale items (option + token level), this machine, one run")
        print(f"{'path':32s} {'seconds':>8s} {'items/s':>8s} {'x local':>8s}")
        for name, s in rows.items():
            print(f"{name:32s} {s:8.2f} {n / s:8.1f} {rows['local (transformers, fp32)'] / s:8.3f}")
        result = {"n_items": n, "concurrency": args.concurrency, "seconds": rows,
                  "items_per_s": {k: n / v for k, v in rows.items()}, "local_token_tail_top20": token_tail(stores["local"])}
        for cap in (20, 5):
            result[f"served_top{cap}"] = {**compare(stores[cap], stores["local"]), "token_tail": token_tail(stores[cap])}
            print(f"top {cap}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in result[f"served_top{cap}"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
