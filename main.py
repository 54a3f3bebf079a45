"""AT-KD workflow: measure the student, write questions for its weak abilities, validate them,
take the teacher's logits, distil; repeat. Each stage runs as a subprocess; rerunning continues.

    python main.py                                  # the embedded demo: two rounds on the CPU
    python main.py --dry_run                        # print the plan and every command, run nothing
    python main.py --num_iterations 1 --num_distill_samples 500 --gpus_to_use 0,1

Edit the constants below to distil your own teacher into your own student; every constant can
also be overridden on the command line by its lower-case name (lists comma-separated). A constant
that feeds a stage has that stage's check and help (the table: atkd/plan.py, FEEDS).
The defaults run the embedded demo (see README.md); values for a real 7B -> 0.5B run are in the comments.
"""

from __future__ import annotations

# ===================================================================== models (Hugging Face folders)
TEACHER_MODEL_PATH = "data/demo/models/teacher"  # writes questions, gives logits; e.g. a 7B instruct model
STUDENT_MODEL_PATH = "data/demo/models/student"  # the model to improve; e.g. a 0.5B of the same family
AGENT_MODEL_1_PATH = "data/demo/models/teacher"  # validation agents: two *different* models by default
AGENT_MODEL_2_PATH = "data/demo/models/agent"

# ===================================================================== data
DOMAIN = "Clinical medicine"  # the ability tree's root (e.g. "临床医学")
EXISTING_ABILITY_TREE_PATH = "ability_trees/demo_tree.json"  # empty: create_initial_tree.py builds one from DOMAIN
DATASET_FILES_PER_ITERATION = ["data/demo/iteration_1.jsonl", "data/demo/iteration_2.jsonl"]  # one per iteration
# An empty entry ("", or [] for every iteration): the teacher labels those questions (label_abilities.py).
ABILITY_CLASS_FILES_PER_ITERATION = ["data/demo/iteration_1_ability_paths.jsonl", "data/demo/iteration_2_ability_paths.jsonl"]
EVAL_DATASET_PATH = "data/demo/eval.jsonl"  # held-out set scored before/after each round; "" for none
EVAL_ABILITY_CLASS_PATH = "data/demo/eval_ability_paths.jsonl"  # "": the teacher labels the evaluation set
DROP_EVAL_OVERLAP = False  # iteration questions repeating evaluation ones: False stops the run, True drops them

# ===================================================================== the loop
NUM_ITERATIONS = 2
NUM_DISTILL_SAMPLES = 480  # questions written per round before validation (reference: 10000)
GPUS_TO_USE = [0]  # e.g. [0, 1, 2, 3]; on a machine without CUDA everything runs on the CPU
SEED = 0  # iteration N uses SEED + N - 1

# ===================================================================== stage knobs
INFERENCE_BATCH_SIZE = 16  # questions per forward pass (steps A, D, E, G, L)
GENERATION_BATCH_SIZE = 16  # prompts per generate call (steps C, D3, D4)
MAX_RETRIES = 3  # extra generation rounds for abilities short of their target
GEN_TEMPERATURE = 0.8  # the teacher's sampling temperature when writing questions
MIN_CONFIDENCE = 0.0  # both agents must give the labelled answer at least this probability (0: off)
TOP_K = 20  # teacher log-probs kept per response token (token-level KD)
PRIOR_STRENGTH = 4.0  # pseudo-questions of the prior that shrinks an ability's accuracy toward its parent's

# ===================================================================== training (train.py under accelerate)
TRAIN_EPOCHS = 10  # the demo's few hundred items; reference: 3
LEARNING_RATE = 1e-3  # the demo's tiny student; for a 0.5B student use ~5e-6 (the reference's value)
BATCH_SIZE = 8  # per process; reference: 2
GRADIENT_ACCUMULATION_STEPS = 1  # reference: 16
TEMPERATURE = 2.0  # distillation temperature T
ALPHA_CE = 0.5  # weight of the CE loss; 1 - ALPHA_CE weighs the KD loss
KD_LOSS = "forward_kl"  # forward_kl | reverse_kl | jsd
SAVE_STEPS = 1000  # optimizer steps between checkpoints
SAVE_TOTAL_LIMIT = 2  # checkpoints kept per iteration (<= 0: all)
ACCELERATE_CONFIG_FILE = ""  # optional `accelerate config` file (it then decides processes, precision, FSDP/DeepSpeed); empty: one process per GPU, bf16; examples in configs/accelerate/ (fsdp2.yaml, zero3.yaml for 7B+ students)
LORA_R = 0  # LoRA rank; 0 = full fine-tuning; e.g. 16 trains adapters only (needs `pip install peft`), final_model is merged
LORA_ALPHA = 16.0  # LoRA alpha: adapter updates are scaled by LORA_ALPHA / LORA_R
LORA_DROPOUT = 0.05  # dropout on the adapters' input
LORA_TARGET_MODULES = ["all-linear"]  # modules that get adapters, e.g. ["q_proj", "v_proj"]; all-linear: every linear layer but the head

# ===================================================================== serving engines and GPUs (optional)
# An OpenAI-compatible server (vLLM, SGLang, llama.cpp, `transformers serve`, a hosted API) can stand in
# for the teacher in every step (tree, labels, questions, its evaluation, its log-probs for step E: then
# TEACHER_MODEL_PATH holds only its tokenizer, or is empty for option-level targets) and for either agent
# (score mode from the letters' log-probs its server returns, else generate mode). README: "Serving engines".
TEACHER_API_BASE = ""  # e.g. "http://127.0.0.1:8000/v1"; empty: the local TEACHER_MODEL_PATH does all
TEACHER_API_MODEL = ""  # the model name the server serves (vllm serve --served-model-name)
AGENT_1_API_BASE = ""  # empty: AGENT_MODEL_1_PATH answers locally
AGENT_1_API_MODEL = ""
AGENT_2_API_BASE = ""
AGENT_2_API_MODEL = ""
API_KEY_ENV = "OPENAI_API_KEY"  # the environment variable holding the servers' key (never a constant: it would be logged)
API_CONCURRENCY = 8  # requests in flight at once per server
API_TIMEOUT_S = 300.0  # seconds per request before it is retried
API_MAX_ATTEMPTS = 4  # tries per request (waits of 1, 2, 4 s between) before the step fails
MODEL_PLACEMENT = "auto"  # local teacher/agents on several GPUs: per_gpu | spread (one copy over all) | auto

# ===================================================================== the distillation signal
ALLOC_TEMPERATURE = 1.0  # step C: questions per ability ~ weakness^(1/T); 1e6 spreads them uniformly
RESPONSE_STYLE = "letter"  # letter | rationale: the teacher also explains each item (step D3, token-level KD)
USE_DATASET_EXPLANATION = True  # rationale style: items with their own explanation (CMExam, MedMCQA) keep it
REASON_WEIGHT = 1.0  # rationale style: an item's reason tokens together weigh this much against its letter (0: each token 1)
REPLAY_FRACTION = 0.25  # share of each round's training items replayed from its own questions (step D2); 0: none
# (0.25: on the demo the abilities the student knew end at 99% instead of 97%; README, python -m bench.ablation)
RESPONSES = "teacher"  # teacher | student (on-policy: the student answers, the teacher scores every token; step D4) | mixed
ON_POLICY_SHARE = 0.5  # mixed: share of the round's written items the student practises on-policy (replayed ones never)
ON_POLICY_KD_LOSS = "reverse_kl"  # divergence on the student's own tokens (GKD, MiniLLM); KD_LOSS for the rest
ON_POLICY_TEMPERATURE = 1.0  # the student's sampling temperature in step D4 (1: its own distribution)

# ===================================================================== outputs
WORKFLOW_OUTPUT_DIR = "./output/workflow"
MODELS_OUTPUT_DIR = "./output/models"
# Experiment trackers: "none", or a comma-separated list of tensorboard, wandb, mlflow (each needs its
# package). TensorBoard's files: WORKFLOW_OUTPUT_DIR/tracking/ (tensorboard --logdir output/workflow/tracking).
REPORT_TO = "none"


def defaults() -> dict:
    """The constants above, by their WorkflowConfig field name."""
    return {name.lower(): value for name, value in globals().items() if name.isupper()}


def main(argv=None) -> int:
    from atkd.cli import stage_main
    from atkd.workflow import WorkflowConfig, run

    return stage_main(WorkflowConfig, run, argv, __doc__.split("\n\n")[0], defaults())


if __name__ == "__main__":
    raise SystemExit(main())
