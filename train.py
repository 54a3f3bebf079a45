"""Distil the teacher into the student (step F): checkpoint-<step>/ folders, then final_model/.

    accelerate launch --num_processes 2 train.py --student_model_path data/demo/models/student --train_file_path output/workflow/iteration_1/D_validated_data/validated.jsonl --teacher_logits_dir output/workflow/iteration_1/E_teacher_logits --output_dir output/models/iteration_1_student_model

Also runs as plain `python train.py ...` (one process; the GPU if there is one, else the CPU).
Sharded training of 7B-8B students: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
(or zero3.yaml, DeepSpeed); the config decides sharding and precision, the flags below decide the
training arithmetic. Master weights are fp32 whatever the precision (see --dtype). `--lora_r 16`
trains LoRA adapters only (needs peft) and writes final_model merged plus final_adapter/.
Loss = alpha_ce * CE + (1 - alpha_ce) * T^2 * KD(teacher || student): CE on the response tokens
only; KD on the option letters at the answer position (any tokenizer) and, when the student
shares the teacher's vocabulary and the data has responses, on every later response token
(top-k + tail bucket). Both terms are averaged over the tokens of a whole gradient-accumulation
window. A rerun resumes from the newest complete checkpoint of the same settings and inputs in
--output_dir; when final_model/ is up to date there is nothing to do.
"""

from atkd.cli import stage_main
from atkd.trainer import TrainConfig, run


def main(argv=None) -> int:
    return stage_main(TrainConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
