"""Distil the teacher into the student (step F): checkpoint-<step>/ folders, then final_model/.

    accelerate launch --num_processes 2 train.py --student_model_path models/student --train_file_path output/workflow/iteration_1/D_validated_data/validated.jsonl --teacher_logits_dir output/workflow/iteration_1/E_teacher_logits --output_dir output/models/iteration_1_student_model

Also runs as plain `python train.py ...` (one process; the GPU if there is one, else the CPU).
Loss = alpha_ce * CE + (1 - alpha_ce) * T^2 * KD(teacher || student): CE on the response tokens
only; KD on the option letters at the answer position (any tokenizer) and, when the student
shares the teacher's vocabulary and the data has responses, on every later response token
(top-k + tail bucket). Both terms are averaged over the tokens of a whole gradient-accumulation
window. A rerun resumes from the newest complete checkpoint in --output_dir; when final_model/
exists for the same settings there is nothing to do.
"""

from __future__ import annotations

import argparse
import os

from atkd.errors import InputError, exit_on_input_error
from atkd.kd_loss import KD_KINDS
from atkd.prompts import LANGUAGES
from atkd.stage import record_args, setup_logging
from atkd.trainer import SCHEDULERS, TRAIN_DTYPES, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student_model_path", required=True, help="the student: a local Hugging Face model folder")
    p.add_argument("--train_file_path", required=True, help="questions .jsonl the teacher's logits were taken on")
    p.add_argument("--teacher_logits_dir", required=True, help="generate_logits.py's --output_dir")
    p.add_argument("--output_dir", required=True, help="folder for checkpoint-<step>/ and final_model/")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the CE loss; 1 - alpha_ce weighs the KD loss")
    p.add_argument("--kd_loss", default="forward_kl", choices=KD_KINDS,
                   help="forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), jsd")
    p.add_argument("--num_epochs", type=int, default=3, help="passes over the training data")
    p.add_argument("--learning_rate", type=float, default=5e-6, help="peak AdamW learning rate")
    p.add_argument("--batch_size", type=int, default=2, help="items per process per micro-batch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=16, help="micro-batches per optimizer step")
    p.add_argument("--save_steps", type=int, default=1000,
                   help="write checkpoint-<step>/ every this many optimizer steps")
    p.add_argument("--save_total_limit", type=int, default=2, help="keep the newest N checkpoints (<= 0: keep all)")
    p.add_argument("--seed", type=int, default=42, help="data order and initialisation seed")
    p.add_argument("--max_length", type=int, default=2048,
                   help="tokens per sequence; longer responses are cut, items whose prompt does not fit are skipped")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--lang", default=None, choices=LANGUAGES,
                   help="prompt language (default: the one the teacher's logits were taken in)")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of steps of linear warm-up")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    p.add_argument("--lr_scheduler", default="cosine", choices=SCHEDULERS, help="learning-rate schedule after warm-up")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (<= 0: off)")
    p.add_argument("--logging_steps", type=int, default=10, help="log the loss every this many steps")
    p.add_argument("--dtype", default="auto", choices=TRAIN_DTYPES,
                   help="auto: fp32 weights with bf16 autocast on GPU, fp32 on CPU; bf16: bf16 weights; fp32")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoint folder")
    p.add_argument("--check_only", action="store_true",
                   help="validate the inputs and exit (0: fine, 2: bad input) without training")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun
    setup_logging(main_process)
    from atkd.models import set_quiet_env
    from atkd.trainer import prepare, train

    set_quiet_env()
    cfg = config_from_args(args)
    if not main_process:  # one voice: rank 0 prints the error, the others only exit with its status
        try:
            prep = prepare(cfg)
        except InputError:
            return 2
        if not args.check_only:
            train(cfg, prep)
        return 0
    with exit_on_input_error():
        prep = prepare(cfg)
        if args.check_only:
            return 0
        if not prep.already_done:
            record_args(args, args.output_dir)
        train(cfg, prep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
