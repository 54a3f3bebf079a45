"""Answer a multiple-choice dataset with a local model (step A): replies.jsonl and summary.json.

    python inference.py --model_path output/models/iteration_1_student_model/final_model --dataset_path data/demo/iteration_1.jsonl --output_path output/workflow/iteration_1/A_student_reply/replies.jsonl

Score mode (default) reads the option-letter probabilities at the answer position, one forward
pass per batch; generate mode writes a chain-of-thought reply and extracts the letter. A killed
run keeps its finished batches; running the same command again completes the rest.
"""

from __future__ import annotations

import argparse

from atkd.errors import exit_on_input_error
from atkd.inference import MODES, InferenceConfig, run_inference
from atkd.prompts import LANGUAGES
from atkd.stage import add_common_model_flags, record_args, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="local Hugging Face model folder")
    p.add_argument("--dataset_path", required=True, help="questions .jsonl (id, question, options, answer_idx)")
    p.add_argument("--output_path", required=True, help="replies .jsonl to write (summary.json goes beside it)")
    p.add_argument("--mode", default="score", choices=MODES,
                   help="score: option-letter probabilities (one forward pass per batch); "
                        "generate: chain-of-thought text, then the letter is extracted")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generate mode: reply length limit (tokens)")
    p.add_argument("--batch_size", type=int, default=16, help="questions per forward pass / generate call")
    p.add_argument("--seed", type=int, default=0, help="torch seed (greedy decoding does not depend on it)")
    p.add_argument("--lang", default="auto", choices=("auto",) + LANGUAGES,
                   help="prompt language; auto detects it from the questions")
    add_common_model_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    with exit_on_input_error():
        cfg = InferenceConfig(model_path=args.model_path, mode=args.mode, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code)
        run_inference(args.dataset_path, args.output_path, cfg, gpu_ids=args.gpu_ids, lang=args.lang)
        record_args(args, args.output_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
