"""Step F, train.py: distillation training, its loop and its resume.

Runs under `accelerate launch` (one process per GPU, or several CPU processes; DDP, FSDP2 or
DeepSpeed ZeRO as the user's accelerate config says) or as a plain single process. Master weights
and AdamW state are fp32; compute is bf16 autocast on GPU (`atkd.distributed` has the rules).
With `--lora_r > 0` only LoRA adapters train (`atkd.lora`) and final_model is the merged model.

Each optimizer step is one gradient-accumulation window: `gradient_accumulation_steps`
micro-batches of `batch_size` items per process. The window's CE tokens and KD positions are
counted over all its micro-batches and all processes *before* the first backward, and every
micro-batch's loss sum is divided by those totals (`atkd.kd_loss`), so the gradient equals that
of one big batch; the backends' own averaging (over processes, over accumulation steps) is undone
(`atkd.distributed.loss_scale`). Gradients are synchronised on the window's last micro-batch only
(`no_sync` before it; DeepSpeed's engine steps there).

The data order of an epoch depends only on (seed, epoch). Checkpoints (`atkd.checkpoint`) carry
the stage's fingerprint; a rerun resumes from the newest one made with the same fingerprint and
ends with the same weights as an uninterrupted run. Checkpoints of other settings or inputs are
stale: they are removed, not resumed. Unsharded checkpoints are read without pickle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from . import distributed, lora, model_card, tracking
from .checkpoint import (STATE_FILE, complete_checkpoints, prune, read_sharded_state, read_training_state,
                         staged_folder, trainer_state, write_sharded_state, write_training_state)
from .cli import (INPUT, MODEL, OUTPUT, Check, StageConfig, above, at_least, between, is_main_process, setting,
                  trust_remote_code)
from .console import progress_bar
from .errors import InputError
from .lifecycle import Outputs, Parts, run_stage
from .kd_loss import KD_KINDS, combined_loss, response_loss_sums
from .logits_store import LogitsStore
from .models import check_model_dir, load_tokenizer
from .paths import checkpoint_dir, done_record, final_adapter_dir, final_model_dir
from .records import load_questions
from .train_data import (ExampleStats, TrainExample, build_examples, collate, epoch_micro_batches, local_slice,
                         token_counts)

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant")
TRAIN_DTYPES = ("auto", "fp32", "bf16")
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's adapters in an unsharded checkpoint


@dataclass(kw_only=True)
class TrainConfig(StageConfig):
    """train.py: distil the teacher's logits into the student."""

    # 2: fp32 master weights under --dtype bf16 (was bf16 weights), backend-neutral loss scaling.
    version: ClassVar[int] = 2

    student_model_path: str = setting(role=MODEL, help="the student: a local Hugging Face model folder")
    train_file_path: str = setting(role=INPUT, help="questions .jsonl the teacher's logits were taken on")
    teacher_logits_dir: str = setting(role=INPUT, help="generate_logits.py's --output_dir")
    output_dir: str = setting(role=OUTPUT, help="folder for checkpoint-<step>/ and final_model/")
    temperature: float = setting(2.0, check=above(0), help="distillation temperature T")
    alpha_ce: float = setting(0.5, check=between(0.0, 1.0),
                              help="weight of the CE loss; 1 - alpha_ce weighs the KD loss")
    kd_loss: str = setting("forward_kl", choices=KD_KINDS,
                           help="forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), jsd")
    on_policy_kd_loss: str = setting("reverse_kl", choices=KD_KINDS,
                                     help="the divergence on the tokens of the student's own responses (items it "
                                          "practised on-policy, step D4); every other KD term uses --kd_loss")
    num_epochs: int = setting(3, check=at_least(1), help="passes over the training data")
    learning_rate: float = setting(5e-6, check=above(0), help="peak AdamW learning rate")
    batch_size: int = setting(2, check=at_least(1), help="items per process per micro-batch")
    gradient_accumulation_steps: int = setting(16, check=at_least(1), help="micro-batches per optimizer step")
    save_steps: int = setting(1000, check=at_least(1), affects_output=False,
                              help="write checkpoint-<step>/ every this many optimizer steps")
    save_total_limit: int = setting(2, affects_output=False, help="keep the newest N checkpoints (<= 0: keep all)")
    seed: int = setting(42, help="data order and initialisation seed")
    reason_weight: float = setting(0.0, check=at_least(0),
                                   help="weight, per item, of the response tokens after the answer letter together, "
                                        "against the letter's 1, in CE and token-level KD (0: every token weighs 1)")
    max_length: int = setting(2048, check=at_least(2),
                              help="tokens per sequence; longer responses are cut, items whose prompt does not fit "
                                   "are skipped")
    gradient_checkpointing: bool = setting(False, affects_output=False, help="recompute activations (less memory)")
    lang: str | None = setting(None, choices=("en", "zh"),
                               help="prompt language (default: the one the teacher's logits were taken in)")
    warmup_ratio: float = setting(0.03, check=Check(lambda v: 0 <= v < 1, "in [0, 1)"),
                                  help="fraction of steps of linear warm-up")
    weight_decay: float = setting(0.0, check=at_least(0), help="AdamW weight decay (not on biases/norms)")
    lr_scheduler: str = setting("cosine", choices=SCHEDULERS, help="learning-rate schedule after warm-up")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm (<= 0: off)")
    logging_steps: int = setting(10, check=at_least(1), affects_output=False,
                                 help="log the loss every this many steps")
    dtype: str = setting("auto", choices=TRAIN_DTYPES,
                         help="compute precision; weights and AdamW state are always fp32 (bf16 weights would round "
                              "updates of ~lr to nothing), so bf16 means fp32 master weights with bf16 autocast. auto: "
                              "what accelerate launch was told (its mixed_precision flag or config file), else bf16 "
                              "autocast on GPU and fp32 on the CPU; bf16/fp32 must agree with accelerate launch's")
    lora_r: int = setting(0, check=at_least(0),
                          help="LoRA rank (0: full fine-tuning); > 0 trains adapters only (needs peft) and writes "
                               "final_model merged plus final_adapter/")
    lora_alpha: float = setting(16.0, check=above(0), help="LoRA alpha: the adapters' update is scaled by alpha / r")
    lora_dropout: float = setting(0.05, check=Check(lambda v: 0 <= v < 1, "in [0, 1)"),
                                  help="dropout probability on the adapters' input")
    lora_target_modules: list[str] = setting(["all-linear"],
                                             help="module names that get adapters (e.g. q_proj,v_proj); all-linear: "
                                                  "every linear layer but the output head")
    trust_remote_code: bool = trust_remote_code()
    check_only: bool = setting(False, affects_output=False,
                               help="validate the inputs and exit (0: fine, 2: bad input) without training")
    report_to: str = tracking.report_to_setting()
    tracking_dir: str = setting("", affects_output=False,
                                help="folder of the trackers' files and run.json (the run's name and id); "
                                     "empty: <output_dir>/tracking (main.py: the workflow's tracking/)")
    tracking_step_offset: int = setting(0, check=at_least(0), affects_output=False,
                                        help="optimizer steps taken before this training (main.py: the earlier "
                                             "iterations'), added to the step numbers the trackers get")

    def trackers_folder(self) -> Path:
        return Path(self.tracking_dir) if self.tracking_dir else tracking.tracking_dir(self.output_dir)

    def outputs(self) -> list[Path]:
        final = final_model_dir(self.output_dir)
        adapter = [final_adapter_dir(self.output_dir) / "adapter_config.json"] if self.lora_r else []
        return [final / "config.json", final / STATE_FILE, *adapter]

    def unused_settings(self) -> tuple[str, ...]:
        return LORA_SETTINGS if self.lora_r == 0 else ()

    def lora(self):
        """peft's LoraConfig of these settings (None for full fine-tuning)."""
        if not self.lora_r:
            return None
        return lora.lora_config(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules)

    def record_path(self) -> Path:
        return done_record(self.output_dir, type(self).__name__)  # in output_dir, not in final_model/


@dataclass
class Prepared:
    """Validated inputs: everything train() needs before it touches a model or writes a file."""

    tokenizer: object
    examples: list[TrainExample]
    stats: ExampleStats
    lang: str
    fingerprint: dict = field(default_factory=dict)  # the done-record's (set when training starts)
    resume_from: Path | None = None
    stale: list[Path] = field(default_factory=list)  # checkpoints of other settings or inputs


def prepare(cfg: TrainConfig) -> Prepared:
    """Check every input (InputError on the first problem); read nothing twice, write nothing."""
    tracking.require_trackers(cfg.report_to, "--report_to")
    check_model_dir(cfg.student_model_path)
    questions = load_questions(cfg.train_file_path)  # an empty file is an InputError here
    store = LogitsStore.open(cfg.teacher_logits_dir)
    lang = cfg.lang or store.lang
    if lang != store.lang:
        raise InputError(cfg.teacher_logits_dir, f"the teacher's logits were taken on {store.lang!r} prompts; "
                                                 f"--lang {lang} would train on other prompts")
    tokenizer = load_tokenizer(cfg.student_model_path, cfg.trust_remote_code)
    if cfg.lora_r:
        lora.check_targets(cfg.student_model_path, cfg.lora(), cfg.trust_remote_code)
    examples, stats = build_examples(questions, store, tokenizer, lang, cfg.max_length, cfg.train_file_path)
    if not examples:
        raise InputError(cfg.train_file_path, f"no item fits in --max_length {cfg.max_length} tokens")
    return Prepared(tokenizer=tokenizer, examples=examples, stats=stats, lang=lang)


def find_checkpoints(prep: Prepared, output_dir: str, fingerprint: dict) -> None:
    """The checkpoint to resume from (saved under this fingerprint), and the stale ones (other settings or inputs)."""
    prep.fingerprint = fingerprint
    for ckpt in complete_checkpoints(output_dir):
        if trainer_state(ckpt).get("fingerprint") == fingerprint:
            prep.resume_from = ckpt
        else:
            prep.stale.append(ckpt)


# --------------------------------------------------------------------------- loss

def micro_batch_loss(model, batch: dict[str, torch.Tensor], n_ce: float, n_kd: float, cfg: TrainConfig,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backward, CE sum, KD sum) of one micro-batch; n_ce/n_kd are the window's totals.

    `scale` undoes the backend's own averaging (`atkd.distributed.loss_scale`): the window's
    normaliser already counts every micro-batch on every process.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], rows=batch["rows"], cols=batch["cols"])
    ce, kd = response_loss_sums(logits, batch, cfg.temperature, cfg.kd_loss, cfg.on_policy_kd_loss)
    loss = combined_loss(ce, kd, n_ce, n_kd, cfg.alpha_ce, cfg.temperature) * scale
    return loss, ce.detach(), kd.detach()


# --------------------------------------------------------------------------- training

@dataclass
class Position:
    """Where the data stream is: the next window to run."""

    epoch: int = 0
    window: int = 0
    step: int = 0


def run(cfg: TrainConfig) -> Path | None:
    """Train (or finish training) and return the final_model folder; None when it was already trained (or with
    --check_only, after checking the inputs)."""
    return run_stage(cfg, lambda: (cfg, prepare(cfg)), train, check_only=cfg.check_only)


def train(job: tuple[TrainConfig, Prepared], parts: Parts) -> Outputs:
    """The training loop, from the last checkpoint saved under these settings; its final model (on every
    process), and the model cards (main process). The done-record is written by the main process only."""
    from accelerate.utils import set_seed

    cfg, prep = job
    find_checkpoints(prep, cfg.output_dir, parts.fingerprint)
    accelerator = distributed.make_accelerator(cfg.dtype, cfg.gradient_accumulation_steps, **_tracker_kwargs(cfg))
    set_seed(cfg.seed)
    _log_examples(prep.stats, accelerator.is_main_process)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a save cut short by a kill
        for stale in prep.stale:
            log.warning("removing %s: it was trained with other settings or inputs", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tracking.start(accelerator, cfg.trackers_folder(), _tracked_settings(cfg))
    accelerator.wait_for_everyone()

    loop = _Loop(cfg, prep, accelerator)
    loop.run()
    final = final_model_dir(out)
    loop.save_final(final)
    if accelerator.is_main_process:
        _write_cards(cfg, prep, final, loop)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    is_main = accelerator.is_main_process
    _close_process_group()
    return Outputs(final, write_record=is_main)


def _close_process_group() -> None:
    """Destroy the process group before the interpreter exits: a gloo group left to the exit can abort the
    process after the work is saved ("terminate called without an active exception", SIGABRT), and NCCL
    warns that the group was not destroyed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tracker_kwargs(cfg: TrainConfig) -> dict:
    """Accelerator(...)'s tracking arguments ({} with --report_to none)."""
    return tracking.accelerator_kwargs(tracking.tracker_names(cfg.report_to), cfg.trackers_folder(),
                                       is_main_process())


def _tracked_settings(cfg: TrainConfig) -> dict:
    """The settings a tracker records with the run (W&B config, MLflow params): those that change results."""
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("affects_output", True)}


def _write_cards(cfg: TrainConfig, prep: Prepared, final: Path, loop: "_Loop") -> None:
    """final_model/README.md (and final_adapter/'s): what train.py knows; main.py adds the evaluation."""
    facts = model_card.training_facts(cfg, prep.stats, loop.total_steps, prep.fingerprint)
    model_card.write_card(final, facts)
    if cfg.lora_r:
        model_card.write_card(final_adapter_dir(cfg.output_dir), facts)


def _log_examples(stats: ExampleStats, main: bool) -> None:
    if not main:
        return
    log.info("%d training items: %d with token-level KD, %d option-level only",
             stats.n_items - len(stats.skipped_too_long), stats.token_level, stats.option_only)
    for reason, n in stats.token_level_off.items():
        log.info("token-level KD off for %d items: %s", n, reason)
    _log_on_policy(stats)
    if stats.skipped_too_long:
        log.warning("skipped %d items whose prompt does not fit in --max_length: %s", len(stats.skipped_too_long),
                    ", ".join(stats.skipped_too_long[:10]) + (" ..." if len(stats.skipped_too_long) > 10 else ""))
    if stats.truncated:
        log.warning("cut the response of %d items to fit in --max_length", stats.truncated)


def _log_on_policy(stats: ExampleStats) -> None:
    """How many items train on the student's own response (step D4), CE on their labelled letter only."""
    if stats.on_policy:
        log.info("%d items on the student's own response (on-policy: KD on every token, CE on the labelled "
                 "letter only)", stats.on_policy)


class _Loop:
    """The model, optimizer, scheduler and data position of one training run."""

    def __init__(self, cfg: TrainConfig, prep: Prepared, accelerator):
        from transformers import get_scheduler

        from .head import HeadAtPositions
        from .models import load_model

        self.cfg, self.prep, self.acc = cfg, prep, accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.sharded = distributed.is_sharded(accelerator)
        self.backend = distributed.backend_name(accelerator)
        self.examples = prep.examples
        # Placeholder items (which fill the last micro-batch) reuse the shortest example at weight 0.
        self.placeholder = min(range(len(self.examples)), key=lambda i: len(self.examples[i].input_ids))
        n_micro = math.ceil(len(self.examples) / (cfg.batch_size * self.world))
        self.windows_per_epoch = math.ceil(n_micro / cfg.gradient_accumulation_steps)
        self.total_steps = self.windows_per_epoch * cfg.num_epochs

        resume = prep.resume_from
        if resume is not None:
            self._check_resumable(resume)
        # An unsharded full fine-tuning checkpoint is itself a model folder; everything else starts from
        # the student and gets its trained weights back below (adapters) or from load_state (shards).
        from_checkpoint = resume is not None and not self.sharded and not cfg.lora_r
        # fp32 master weights whatever the compute precision (see atkd.distributed).
        model = load_model(resume if from_checkpoint else cfg.student_model_path, torch.device("cpu"), "fp32",
                           cfg.trust_remote_code)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r:
            lora.add_adapters(model, cfg.lora())  # in place: `model` now runs through its adapters
            if resume is not None and not self.sharded:
                from safetensors.torch import load_file

                lora.load_adapter_weights(model, load_file(str(resume / ADAPTER_FILE)), resume)
        model.train()
        # The head is checked against the model's own logits, except under ZeRO-3: there the weights are
        # partitioned from load on and no whole forward exists before DeepSpeed wraps the model.
        zero3 = distributed.is_zero3(accelerator)
        if zero3 and accelerator.is_main_process:
            log.warning("ZeRO-3: the student's output head is not verified against model(...).logits here "
                        "(inference.py on the same folder, main.py's step A, verifies it)")
        with distributed.whole_params(accelerator, model.get_output_embeddings().parameters()):
            head = HeadAtPositions(model, len(prep.tokenizer), verify=not zero3)  # reads the head's shape
        # FSDP2's auto-wrap shards each of these layer classes separately; it looks for them on the root.
        head._no_split_modules = getattr(model, "_no_split_modules", None)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        # Not prepared by accelerate: it would step the schedule once per process.
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        distributed.fill_deepspeed_config(accelerator, cfg.batch_size, cfg.gradient_accumulation_steps,
                                          cfg.max_grad_norm)
        distributed.gather_head_in_root(accelerator, head, model)
        self.model, self.optimizer = accelerator.prepare(head, optimizer)
        self.scale = distributed.loss_scale(accelerator)
        self.pos = Position()
        self.log_history: list[dict] = []
        self.tokens, self.since = 0, time.perf_counter()  # input tokens of all processes since the last log
        if resume is not None:
            self._restore(resume)

    # ---- the loop

    def run(self) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            log.info("training (%s, mixed precision %s%s): %d processes x %d items x %d micro-batches per step; "
                     "%d steps (%d per epoch)", self.backend, acc.mixed_precision,
                     f", LoRA r={cfg.lora_r}" if cfg.lora_r else "", self.world, cfg.batch_size,
                     cfg.gradient_accumulation_steps, self.total_steps, self.windows_per_epoch)
        bar = progress_bar(total=self.total_steps, initial=self.pos.step, desc="train", unit="step",
                           disable=not acc.is_main_process)
        running = torch.zeros(4, dtype=torch.float64)  # CE sum, KD sum, CE tokens, KD positions since last log
        for epoch in range(self.pos.epoch, cfg.num_epochs):
            micro = epoch_micro_batches(len(self.examples), cfg.batch_size, self.world, cfg.seed, epoch)
            windows = [micro[i:i + cfg.gradient_accumulation_steps]
                       for i in range(0, len(micro), cfg.gradient_accumulation_steps)]
            start = self.pos.window if epoch == self.pos.epoch else 0
            for w in range(start, len(windows)):
                running += self._step(windows[w])
                self.tokens += self._window_tokens(windows[w])
                self.pos = Position(epoch, w + 1, self.pos.step + 1)
                if w + 1 == len(windows):
                    self.pos = Position(epoch + 1, 0, self.pos.step)
                bar.update(1)
                if self.pos.step % cfg.logging_steps == 0 or self.pos.step == self.total_steps:
                    self._log(running, bar)
                    running.zero_()
                if self.pos.step % cfg.save_steps == 0 and self.pos.step < self.total_steps:
                    self.save_checkpoint(checkpoint_dir(cfg.output_dir, self.pos.step))
        bar.close()

    def _step(self, window: list[list[int]]) -> torch.Tensor:
        """One optimizer step over a window of global micro-batches; returns this process's loss sums."""
        cfg, acc = self.cfg, self.acc
        batches = [self._local_batch(mb) for mb in window]
        counts = torch.tensor([sum(token_counts(b)[i] for b in batches) for i in (0, 1)], dtype=torch.float64,
                              device=acc.device)
        n_ce, n_kd = acc.reduce(counts, reduction="sum").tolist()
        sums = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # The window decides where gradients are synchronised (a short last window included):
            # no_sync before its last micro-batch (DDP, FSDP2), and DeepSpeed's engine steps at it.
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss, ce, kd = micro_batch_loss(self.model, batch, n_ce, n_kd, cfg, self.scale)
                acc.backward(loss)
            sums += torch.stack([ce.double().cpu(), kd.double().cpu()])
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)  # DeepSpeed: clipped in its step
        self.optimizer.step()  # under DeepSpeed a no-op: its engine stepped in the last backward
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Counts are already global: each process reports its share so the log's sum over processes is exact.
        return torch.cat([sums, torch.tensor([n_ce, n_kd], dtype=torch.float64) / self.world])

    def _local_batch(self, micro_batch: list[int]) -> dict[str, torch.Tensor]:
        idx = local_slice(micro_batch, self.cfg.batch_size, self.rank)
        examples = [self.examples[i if i >= 0 else self.placeholder] for i in idx]
        weights = [1.0 if i >= 0 else 0.0 for i in idx]
        batch = collate(examples, weights, self.prep.tokenizer.pad_token_id, self.cfg.reason_weight)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _log(self, running: torch.Tensor, bar) -> None:
        total = self.acc.reduce(running.to(self.acc.device), reduction="sum").cpu()
        ce = float(total[0] / max(total[2], 1.0))
        kd = float(total[1] / max(total[3], 1.0))
        loss = self.cfg.alpha_ce * ce + (1 - self.cfg.alpha_ce) * self.cfg.temperature ** 2 * kd
        entry = {"step": self.pos.step, "epoch": self.pos.epoch, "loss": loss, "ce": ce, "kd": kd,
                 "lr": self.scheduler.get_last_lr()[0]}
        self.log_history.append(entry)
        self._track(entry)
        if self.acc.is_main_process:
            bar.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.4f}", kd=f"{kd:.4f}", refresh=False)  # shown at the next draw
            log.info("step %d: loss %.4f (ce %.4f, kd %.4f), lr %.3g", entry["step"], loss, ce, kd, entry["lr"])

    def _window_tokens(self, window: list[list[int]]) -> int:
        """Input tokens of a window's real items on every process (each process knows the global micro-batches)."""
        return sum(len(self.examples[i].input_ids) for mb in window for i in mb if i >= 0)

    def _track(self, entry: dict) -> None:
        """A log entry to the trackers, at the run's global step, with the tokens per second since the last one."""
        now = time.perf_counter()
        tokens_per_s = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        if self.acc.log_with:
            self.acc.log(tracking.train_scalars(entry, tokens_per_s), step=self.cfg.tracking_step_offset + entry["step"])

    # ---- checkpoints

    def _state(self) -> dict:
        return {"global_step": self.pos.step, "epoch": self.pos.epoch, "window": self.pos.window,
                "world_size": self.world, "backend": self.backend, "sharded": self.sharded,
                "mixed_precision": self.acc.mixed_precision, "total_steps": self.total_steps,
                "fingerprint": self.prep.fingerprint, "log_history": self.log_history,
                "examples": asdict(self.prep.stats)}

    def save_checkpoint(self, folder: Path) -> None:
        """A resumable checkpoint (every process calls this); older ones beyond save_total_limit are removed."""
        with staged_folder(self.acc, folder, self._state()) as tmp:
            if self.sharded:
                write_sharded_state(self.acc, tmp, self.scheduler)
            else:
                write_training_state(self.acc, tmp, self.optimizer, self.scheduler)
                if self.acc.is_main_process:
                    model = self.acc.unwrap_model(self.model).model
                    if self.cfg.lora_r:
                        from safetensors.torch import save_file

                        save_file(lora.adapter_weights(model.state_dict()), str(tmp / ADAPTER_FILE))
                    else:
                        model.save_pretrained(str(tmp), safe_serialization=True)
            if self.acc.is_main_process:
                self.prep.tokenizer.save_pretrained(str(tmp))
        if self.acc.is_main_process:
            prune(self.cfg.output_dir, self.cfg.save_total_limit)
        self.acc.wait_for_everyone()

    def save_final(self, folder: Path) -> None:
        """The trained student as a plain Hugging Face folder (LoRA: merged, the adapters beside it).

        The weights are gathered from every process's shards onto the main process, which writes them.
        """
        weights = distributed.full_state_dict(self.acc, self.model)
        main = self.acc.is_main_process
        if self.cfg.lora_r:
            adapter = final_adapter_dir(self.cfg.output_dir)
            with staged_folder(self.acc, adapter) as adapter_tmp, staged_folder(self.acc, folder, self._state()) as tmp:
                if main:
                    lora.write_merged(tmp, adapter_tmp, self.cfg.student_model_path, self.cfg.lora(), weights,
                                      self.prep.tokenizer, self.cfg.trust_remote_code)
            return
        with staged_folder(self.acc, folder, self._state()) as tmp:
            if main:
                model = self.acc.unwrap_model(self.model).model
                model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True)
                self.prep.tokenizer.save_pretrained(str(tmp))

    def _check_resumable(self, folder: Path) -> None:
        """InputError when `folder` was written in a layout this run cannot read (another backend)."""
        state = trainer_state(folder)
        was = state.get("backend", "single" if state.get("world_size", 1) == 1 else "ddp")
        sharded_then = bool(state.get("sharded", False))
        if sharded_then != self.sharded or (self.sharded and was != self.backend):
            raise InputError(folder, f"this checkpoint was written under {was}, this run is {self.backend}: its "
                                     "files cannot be read here. Rerun with the accelerate config that wrote it, or "
                                     "delete the checkpoint-* folders to start over")
        if was.startswith("deepspeed") and state.get("world_size") != self.world:
            raise InputError(folder, f"DeepSpeed checkpoints are per process: written by {state.get('world_size')} "
                                     f"processes, this run has {self.world}")

    def _restore(self, folder: Path) -> None:
        if self.sharded:
            read_sharded_state(self.acc, folder, self.scheduler)
        else:
            read_training_state(folder, self.optimizer, self.scheduler, self.rank)
        state = trainer_state(folder)
        if state.get("world_size") != self.world:
            log.warning("%s was written by %s processes, this run has %d: the data order after it differs "
                        "from an uninterrupted run", folder, state.get("world_size"), self.world)
        self.pos = Position(state["epoch"], state["window"], state["global_step"])
        self.log_history = list(state.get("log_history", []))
        if self.acc.is_main_process:
            log.info("resumed from %s (step %d of %d)", folder, self.pos.step, self.total_steps)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
