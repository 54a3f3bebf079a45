"""Store the teacher's answer distributions for distillation (step E): safetensors shards + index.json.

    python generate_logits.py --model_path models/teacher --dataset_path output/workflow/iteration_1/D_validated_data/validated.jsonl --output_dir output/workflow/iteration_1/E_teacher_logits --gpu_ids 0,1

Per item: the teacher's log-probabilities over the option letters at the answer position
(tokenizer independent, so the student may come from another family). With --response_field,
also the top-k log-probabilities and the leftover tail mass at every response token after the
letter (usable for token-level KD when the student shares the teacher's vocabulary; the index
records a tokenizer fingerprint so train.py can tell). index.json also holds the teacher's
accuracy (summary.json too). A killed run keeps its finished shards; the same command resumes.
"""

from __future__ import annotations

import argparse
import logging

from atkd.errors import InputError, exit_on_input_error
from atkd.prompts import LANGUAGES
from atkd.stage import add_common_model_flags, record_args, setup_logging

log = logging.getLogger("generate_logits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the teacher: a local Hugging Face model folder")
    p.add_argument("--dataset_path", required=True, help="questions .jsonl (the data the student trains on)")
    p.add_argument("--output_dir", required=True, help="folder for index.json, summary.json and the shards")
    p.add_argument("--top_k", type=int, default=20, help="token-level KD: teacher log-probs kept per response token")
    p.add_argument("--batch_size", type=int, default=8, help="items per teacher forward pass")
    p.add_argument("--lang", default="auto", choices=("auto",) + LANGUAGES,
                   help="prompt language; auto detects it from the questions")
    p.add_argument("--response_field", default=None,
                   help="record field holding a longer response (e.g. an explanation) for token-level KD; "
                        "unset: option-level only")
    p.add_argument("--shard_size", type=int, default=500, help="items per safetensors shard (the unit of resume)")
    add_common_model_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    with exit_on_input_error():
        from atkd.logits_store import generate_store, validate_inputs
        from atkd.models import load_tokenizer, parse_gpu_ids, set_quiet_env, usable_gpu_ids
        from atkd.prompts import language_of
        from atkd.records import load_questions

        set_quiet_env()
        if args.batch_size < 1 or args.shard_size < 1:
            raise InputError(None, "--batch_size and --shard_size must be >= 1")
        gpu_ids = usable_gpu_ids(parse_gpu_ids(args.gpu_ids))
        questions = load_questions(args.dataset_path)
        tokenizer = load_tokenizer(args.model_path, args.trust_remote_code)
        lang = language_of(questions, args.lang)
        validate_inputs(questions, tokenizer, lang, args.top_k, args.response_field, args.dataset_path)
        job_args = dict(model_path=args.model_path, lang=lang, top_k=args.top_k, batch_size=args.batch_size,
                        response_field=args.response_field, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
        summary = generate_store(questions, tokenizer, args.output_dir, gpu_ids, job_args, args.shard_size)
        record_args(args, args.output_dir)
    log.info("teacher accuracy %.3f (%d/%d) on %s; %d shard(s) in %s", summary["accuracy"], summary["correct"],
             summary["n"], args.dataset_path, summary["shards"], args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
