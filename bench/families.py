"""Chat-format families: the letter token, the letter mass, where generation stops, the think block.

    python -m bench.families                 # from the repository root; CPU, 2-3 minutes (1 thread)

For each chat format of `atkd.tiny.CHAT_FORMATS` (tokenizers shaped like Qwen2.5, Llama-3,
Llama-2/Mistral, Gemma, DeepSeek-R1 distills and Qwen3, trained here): a tiny Llama is trained
for --steps steps on MCQ prompts rendered through that family's template followed by the reply
the template renders for the answer letter (the letter, then whatever ends the turn). Then, on
held-out questions:
- the letter token the pipeline scores (`letters.letter_token_ids`), against the token the previous
  rule chose (the bare letter appended to the prompt), and the mean letter mass under each;
- the token a trained response ends with (`sequence.response_end_id`), against the tokenizer's eos
  (the previous rule);
- whether greedy generation stops at the end of the turn with the pipeline's stop ids
  (`generation.stop_token_ids`), against stopping at the tokenizer's eos alone (the previous rule);
- how the think block is handled (`prompts.think_handling`).
Then, for each architecture family of `atkd.tiny.HEAD_FAMILIES` the installed transformers has
(tiny random models whose forward scales or soft-caps the logits), the largest difference between
`model(...).logits` and the project's head (`atkd.head.HeadAtPositions`), against the previous rule
(`F.linear` on the head weight, then a division by `logits_scaling` and Gemma's soft-cap), and
whether the load-time check (`atkd.head.verify_head`) accepts the model.
Prints two tables and writes bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from atkd.batching import left_pad
from atkd.errors import InputError
from atkd.generation import end_of_turn_id, stop_token_ids
from atkd.letters import letter_token_ids
from atkd.prompts import encode_prompt, mcq_prompt, question_block, render, reply_token_ids, think_handling
from atkd.records import LETTERS, Question
from atkd.scoring import last_position_logits, letter_mass_summary, scores_from_logits
from atkd.sequence import response_end_id
from atkd.head import HeadAtPositions, verify_head
from atkd.tiny import CHAT_FORMATS, HEAD_FAMILIES, build_model, generation_eos_ids, head_family_model, train_chat_tokenizer

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
        "response_ends_with": tok.convert_ids_to_tokens(response_end_id(tok)),  # E's and F's sequences
        "stop_tokens": tok.convert_ids_to_tokens(stop_token_ids(model, tok)),
        "stops_at_end_of_turn": stops_new, "mean_generated_tokens": len_new,
        "previous_rule_stops": stops_old, "previous_rule_mean_generated_tokens": len_old,
        "think_handling": think_handling(tok),
        "final_train_loss": final_loss,
        "seconds": time.perf_counter() - start,
    }


def print_table(rows: list[dict], max_new_tokens: int) -> None:
    head = ["family", "letter token (was)", "letter mass (was)", "end of turn", "trained response ends with (was)",
            "stops at end of turn (was)", "think block"]
    lines = [[r["family"], f"{r['letter_token']!r} ({r['previous_rule_letter_token']!r})",
              f"{r['mean_letter_mass']:.3f} ({r['previous_rule_mean_letter_mass']:.3f})", str(r["end_of_turn_token"]),
              f"{r['response_ends_with']} ({r['tokenizer_eos']})",
              f"{r['stops_at_end_of_turn']:.0%} in {r['mean_generated_tokens']:.1f} tok "
              f"({r['previous_rule_stops']:.0%} in {r['previous_rule_mean_generated_tokens']:.1f})",
              r["think_handling"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for row in [head, ["-" * w for w in widths]] + lines:
        print(" | ".join(x.ljust(w) for x, w in zip(row, widths)))
    print(f"(was: the previous rule; generation capped at {max_new_tokens} new tokens)")


def previous_rule_logits(model, hidden: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """The head as AT-KD computed it before: the weight's first rows, then Granite's division and Gemma's soft-cap."""
    head = model.get_output_embeddings()
    logits = F.linear(hidden, head.weight[:n_vocab], head.bias[:n_vocab] if head.bias is not None else None)
    cfg = model.config
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    return logits


@torch.no_grad()
def bench_head(name: str) -> dict | None:
    """max |head logits - model(...).logits| over a 2 x 16 batch, now and under the previous rule."""
    try:
        model = head_family_model(name)
    except ValueError:
        return None
    n_vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    inputs = left_pad([torch.randint(3, n_vocab, (n,), generator=g).tolist() for n in (16, 11)], pad_id=0)
    rows, cols = torch.tensor([0] * 16 + [1] * 11), torch.tensor(list(range(16)) + list(range(5, 16)))
    want = model(**inputs, use_cache=False).logits[rows, cols].float()
    head = HeadAtPositions(model, n_vocab, verify=False)
    hidden = head.hidden_at(**inputs, rows=rows, cols=cols)
    try:
        verify_head(head)
        accepted = True
    except InputError:
        accepted = False
    return {"family": name, "model": type(model).__name__, "scaling": str(head.scaling),
            "max_diff": (head.logits(hidden).float() - want).abs().max().item(),
            "previous_rule_max_diff": (previous_rule_logits(model, hidden, n_vocab).float() - want).abs().max().item(),
            "logit_range": want.abs().max().item(), "accepted_at_load": accepted}


def print_head_table(rows: list[dict]) -> None:
    head = ["architecture", "max |head - model(...).logits| (was)", "max |logit|", "accepted at load"]
    lines = [[r["family"], f"{r['max_diff']:.1e} ({r['previous_rule_max_diff']:.1e})", f"{r['logit_range']:.2f}",
              "yes" if r["accepted_at_load"] else "no"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for row in [head, ["-" * w for w in widths]] + lines:
        print(" | ".join(x.ljust(w) for x, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(CHAT_FORMATS),
                        help="comma-separated names of CHAT_FORMATS (empty: the head table only)")
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
    rows = [bench_family(name, args) for name in args.families.split(",")] if args.families else []
    if rows:
        print_table(rows, args.max_new_tokens)
    heads = [r for r in (bench_head(name) for name in HEAD_FAMILIES) if r is not None]
    print()
    print_head_table(heads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "heads": heads, "settings": vars(args),
                                   "seconds": time.perf_counter() - start,
                                   "torch": torch.__version__, "platform": platform.platform(),
                                   "letters": LETTERS[:4]}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
