"""Chat-format families: the letter token, the letter mass, where generation stops, the think block.

    python -m bench.families                 # from the repository root; CPU, 2-3 minutes (1 thread)

For each chat format of `atkd.tiny.CHAT_FORMATS` (tokenizers shaped like Qwen2.5, Llama-3,
Llama-2/Mistral, Gemma, DeepSeek-R1 distills and Qwen3, trained here): a tiny Llama is trained
for --steps steps on MCQ prompts rendered through that family's template followed by the reply
the template renders for the answer letter (the letter, then whatever ends the turn). Then, on
held-out questions:
- the letter token the pipeline scores (`letters.letter_token_ids`), against the token the previous
  rule chose (the bare letter appended to the prompt), and the mean letter mass under each;
- whether greedy generation stops at the end of the turn with the pipeline's stop ids
  (`generation.stop_token_ids`), against stopping at the tokenizer's eos alone (the previous rule);
- how the think block is handled (`prompts.think_handling`).
Prints a table and writes bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from atkd.batching import left_pad
from atkd.generation import end_of_turn_id, stop_token_ids
from atkd.letters import letter_token_ids
from atkd.prompts import encode_prompt, mcq_prompt, question_block, render, reply_token_ids, think_handling
from atkd.records import LETTERS, Question
from atkd.scoring import last_position_logits, letter_mass_summary, scores_from_logits
from atkd.tiny import CHAT_FORMATS, build_model, generation_eos_ids, train_chat_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "families.json"
WORDS = ("heart lung liver kidney aspirin insulin heparin warfarin femur tibia nerve muscle virus bacteria "
         "fungus enzyme protein vein artery cell blood bone skin brain").split()


def make_questions(n: int, seed: int) -> list[Question]:
    """n four-option questions with a random answer (only the reply's format is learnable)."""
    rng = random.Random(seed)
    return [Question(id=i, question=f"Which of these is linked to the {rng.choice(WORDS)}?",
                     options=dict(zip("ABCD", rng.sample(WORDS, 4))), answer_idx=rng.choice("ABCD"))
            for i in range(n)]


def training_rows(tok, questions: list[Question]) -> list[tuple[list[int], int]]:
    """(prompt + templated reply ids, prompt length) per question: the reply as the template writes it."""
    replies = {L: reply_token_ids(tok, L) for L in "ABCD"}
    rows = []
    for q in questions:
        prompt = encode_prompt(tok, mcq_prompt(tok, q, "en"))
        rows.append((prompt + replies[q.answer_idx], len(prompt)))
    return rows


def train(model, rows, pad_id: int, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Next-token CE on the reply tokens only; returns the last step's loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        inputs = left_pad([ids[:-1] for ids, _ in batch], pad_id)
        width = inputs["input_ids"].shape[1]
        targets = torch.full((len(batch), width), -100)
        for r, (ids, n_prompt) in enumerate(batch):
            reply = torch.tensor(ids[n_prompt:])
            targets[r, width - len(reply):] = reply  # positions that predict a reply token
        logits = model(**inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def previous_rule_letter_ids(tok, letters: str) -> list[int]:
    """The former rule for chat templates: the token after the rendered prompt when the bare letter is appended."""
    base = encode_prompt(tok, render(tok, "?"))
    return [encode_prompt(tok, render(tok, "?") + L)[len(base)] for L in letters]


def mean_letter_mass(model, tok, prompts: list[list[int]], letter_ids: list[int], source: str) -> float:
    """Mean letter mass over `prompts` (letter_mass_summary logs a warning when it is below 0.5)."""
    logits = last_position_logits(model, prompts, tok.pad_token_id, [letter_ids] * len(prompts), len(tok))
    scores = scores_from_logits(logits, [letter_ids] * len(prompts), [list("ABCD")] * len(prompts))
    return letter_mass_summary([s.letter_mass for s in scores], source=source)["mean_letter_mass"]


@torch.no_grad()
def stop_share(model, tok, prompts: list[list[int]], eos: list[int], max_new_tokens: int) -> tuple[float, float]:
    """(share of replies that ended within max_new_tokens, mean generated tokens) when generation stops at `eos`."""
    inputs = left_pad(prompts, tok.pad_token_id)
    inputs.pop("position_ids")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    lengths = [next((i + 1 for i, t in enumerate(row) if t in eos), None) for row in new]
    stopped = [n for n in lengths if n is not None]
    mean_len = sum(n if n is not None else max_new_tokens for n in lengths) / len(lengths)
    return len(stopped) / len(lengths), mean_len


def bench_family(name: str, args) -> dict:
    start = time.perf_counter()
    train_qs, test_qs = make_questions(args.n_train, seed=1), make_questions(args.n_test, seed=2)
    tok = train_chat_tokenizer([question_block(q, "en", with_answer=True) for q in train_qs], name,
                               vocab_size=args.vocab_size)
    model = build_model(tok, seed=0, generation_eos=generation_eos_ids(tok, name), hidden=64, layers=2, heads=4)
    rows = training_rows(tok, train_qs)
    final_loss = train(model, rows, tok.pad_token_id, args.steps, args.batch_size, args.lr, seed=0)
    prompts = [encode_prompt(tok, mcq_prompt(tok, q, "en")) for q in test_qs]
    new_ids, old_ids = letter_token_ids(tok, list("ABCD")), previous_rule_letter_ids(tok, "ABCD")
    eot = end_of_turn_id(tok)
    stops_new, len_new = stop_share(model, tok, prompts, stop_token_ids(model, tok), args.max_new_tokens)
    stops_old, len_old = stop_share(model, tok, prompts, [tok.eos_token_id], args.max_new_tokens)
    return {
        "family": name,
        "letter_token": tok.convert_ids_to_tokens(new_ids[0]),
        "previous_rule_letter_token": tok.convert_ids_to_tokens(old_ids[0]),
        "mean_letter_mass": mean_letter_mass(model, tok, prompts, new_ids, f"{name} (letter rule)"),
        "previous_rule_mean_letter_mass": mean_letter_mass(model, tok, prompts, old_ids, f"{name} (previous rule)"),
        "tokenizer_eos": tok.eos_token,
        "end_of_turn_token": tok.convert_ids_to_tokens(eot) if eot is not None else None,
        "stop_tokens": tok.convert_ids_to_tokens(stop_token_ids(model, tok)),
        "stops_at_end_of_turn": stops_new, "mean_generated_tokens": len_new,
        "previous_rule_stops": stops_old, "previous_rule_mean_generated_tokens": len_old,
        "think_handling": think_handling(tok),
        "final_train_loss": final_loss,
        "seconds": time.perf_counter() - start,
    }


def print_table(rows: list[dict], max_new_tokens: int) -> None:
    head = ["family", "letter token (was)", "letter mass (was)", "end of turn", "stops at end of turn (was)",
            "think block"]
    lines = [[r["family"], f"{r['letter_token']!r} ({r['previous_rule_letter_token']!r})",
              f"{r['mean_letter_mass']:.3f} ({r['previous_rule_mean_letter_mass']:.3f})", str(r["end_of_turn_token"]),
              f"{r['stops_at_end_of_turn']:.0%} in {r['mean_generated_tokens']:.1f} tok "
              f"({r['previous_rule_stops']:.0%} in {r['previous_rule_mean_generated_tokens']:.1f})",
              r["think_handling"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for row in [head, ["-" * w for w in widths]] + lines:
        print(" | ".join(x.ljust(w) for x, w in zip(row, widths)))
    print(f"(was: the previous rule; generation capped at {max_new_tokens} new tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(CHAT_FORMATS), help="comma-separated names of CHAT_FORMATS")
    parser.add_argument("--steps", type=int, default=300, help="training steps per family")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n_train", type=int, default=400)
    parser.add_argument("--n_test", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=500)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pin it on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [bench_family(name, args) for name in args.families.split(",")]
    print_table(rows, args.max_new_tokens)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "settings": vars(args), "seconds": time.perf_counter() - start,
                                   "torch": torch.__version__, "platform": platform.platform(),
                                   "letters": LETTERS[:4]}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
