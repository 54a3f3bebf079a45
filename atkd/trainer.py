"""Distillation training (step F): the loop, checkpoints and resume of train.py.

Runs under `accelerate launch` (one process per GPU, or several CPU processes with --cpu) or as a
plain single process. Weights are fp32 with bf16 autocast on GPU (`--dtype auto`), fp32 on the CPU.

Each optimizer step is one gradient-accumulation window: `gradient_accumulation_steps`
micro-batches of `batch_size` items per process. The window's CE tokens and KD positions are
counted over all its micro-batches and all processes *before* the first backward, and every
micro-batch's loss sum is divided by those totals (DESIGN §9), so the gradient equals that of one
big batch; data-parallel averaging is undone by multiplying by the number of processes.

The data order of an epoch depends only on (seed, epoch). A checkpoint (`checkpoint-<step>/`)
holds the model (safetensors) and tokenizer, the optimizer (safetensors + JSON), the scheduler,
each process's RNG state and the position in the data; it is written to a hidden temp folder and
renamed when complete. A rerun resumes from the newest one and ends with the same weights as an
uninterrupted run. `final_model/` is written the same way. Nothing here is read with pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .io import read_json, write_bytes, write_json
from .kd_loss import KD_KINDS, HeadAtPositions, combined_loss, response_loss_sums
from .logits_store import LogitsStore
from .models import check_model_dir, load_tokenizer
from .paths import CHECKPOINT_PREFIX, checkpoint_dir, final_model_dir
from .prompts import LANGUAGES
from .records import load_questions
from .train_data import (ExampleStats, TrainExample, build_examples, collate, epoch_micro_batches, local_slice,
                         token_counts)

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant")
TRAIN_DTYPES = ("auto", "fp32", "bf16")
STATE_FILE = "trainer_state.json"  # written last into a checkpoint / final_model
# Settings that do not change the trained weights: a resume may change them.
_NOT_FINGERPRINTED = ("output_dir", "save_steps", "save_total_limit", "logging_steps", "gradient_checkpointing")


@dataclass
class TrainConfig:
    """train.py's settings (see its --help for meanings)."""

    student_model_path: str
    train_file_path: str
    teacher_logits_dir: str
    output_dir: str
    temperature: float = 2.0
    alpha_ce: float = 0.5  # weight of the CE term; 1 - alpha_ce weighs the KD term
    kd_loss: str = "forward_kl"
    num_epochs: int = 3
    learning_rate: float = 5e-6
    batch_size: int = 2  # items per process per micro-batch
    gradient_accumulation_steps: int = 16
    save_steps: int = 1000
    save_total_limit: int = 2  # <= 0 keeps every checkpoint
    seed: int = 42
    max_length: int = 2048  # tokens per sequence (prompt + response)
    gradient_checkpointing: bool = False
    lang: str | None = None  # None: the language the teacher's logits were taken in
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    logging_steps: int = 10
    dtype: str = "auto"
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        checks = [
            (self.temperature > 0, "--temperature must be > 0"),
            (0.0 <= self.alpha_ce <= 1.0, "--alpha_ce must be between 0 and 1 (it is the CE weight)"),
            (self.kd_loss in KD_KINDS, f"--kd_loss must be one of {', '.join(KD_KINDS)}"),
            (self.num_epochs >= 1, "--num_epochs must be >= 1"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (self.batch_size >= 1, "--batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
            (self.save_steps >= 1, "--save_steps must be >= 1"),
            (self.max_length >= 2, "--max_length must be >= 2"),
            (0.0 <= self.warmup_ratio < 1.0, "--warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
            (self.lr_scheduler in SCHEDULERS, f"--lr_scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.logging_steps >= 1, "--logging_steps must be >= 1"),
            (self.dtype in TRAIN_DTYPES, f"--dtype must be one of {', '.join(TRAIN_DTYPES)}"),
            (self.lang is None or self.lang in LANGUAGES, f"--lang must be one of {', '.join(LANGUAGES)}"),
        ]
        return [msg for ok, msg in checks if not ok]


@dataclass
class Prepared:
    """Validated inputs: everything train() needs before it touches a model or writes a file."""

    tokenizer: object
    examples: list[TrainExample]
    stats: ExampleStats
    lang: str
    fingerprint: dict
    resume_from: Path | None = None
    resume_state: dict = field(default_factory=dict)
    already_done: bool = False


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(cfg: TrainConfig, lang: str) -> dict:
    """What determines the trained weights: settings plus the contents of the data and the logits index."""
    fp = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fp["student_model_path"] = str(Path(cfg.student_model_path).resolve())
    fp["train_file_path"] = file_sha256(cfg.train_file_path)
    fp["teacher_logits_dir"] = file_sha256(Path(cfg.teacher_logits_dir) / "index.json")
    fp["lang"] = lang
    return fp


def prepare(cfg: TrainConfig) -> Prepared:
    """Check every input (InputError on the first problem); read nothing twice, write nothing."""
    problems = cfg.problems()
    if problems:
        raise InputError(None, problems[0])
    check_model_dir(cfg.student_model_path)
    questions = load_questions(cfg.train_file_path)  # an empty file is an InputError here
    store = LogitsStore.open(cfg.teacher_logits_dir)
    lang = cfg.lang or store.lang
    if lang != store.lang:
        raise InputError(cfg.teacher_logits_dir, f"the teacher's logits were taken on {store.lang!r} prompts; "
                                                 f"--lang {lang} would train on other prompts")
    tokenizer = load_tokenizer(cfg.student_model_path, cfg.trust_remote_code)
    examples, stats = build_examples(questions, store, tokenizer, lang, cfg.max_length, cfg.train_file_path)
    if not examples:
        raise InputError(cfg.train_file_path, f"no item fits in --max_length {cfg.max_length} tokens")
    prep = Prepared(tokenizer=tokenizer, examples=examples, stats=stats, lang=lang,
                    fingerprint=run_fingerprint(cfg, lang))
    out = Path(cfg.output_dir)
    final = final_model_dir(out)
    if final.is_dir():
        _check_same_run(final, prep.fingerprint)
        prep.already_done = True
        return prep
    newest = newest_checkpoint(out)
    if newest is not None:
        prep.resume_state = _check_same_run(newest, prep.fingerprint)
        prep.resume_from = newest
    return prep


def _check_same_run(folder: Path, fingerprint: dict) -> dict:
    """The folder's trainer state when it was trained with these settings and data, else InputError."""
    if not (folder / STATE_FILE).is_file():
        raise InputError(folder, "exists but was not written by train.py; remove it or choose another --output_dir")
    state = read_json(folder / STATE_FILE)
    old = state.get("fingerprint", {})
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise InputError(folder, f"was trained with other settings or data ({', '.join(changed)} changed); "
                                 "remove it or choose another --output_dir")
    return state


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (temp folders of a killed save are ignored)."""
    return (complete_checkpoints(output_dir) or [None])[-1]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


# --------------------------------------------------------------------------- loss

def micro_batch_loss(model, batch: dict[str, torch.Tensor], n_ce: float, n_kd: float, cfg: TrainConfig,
                     world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backward, CE sum, KD sum) of one micro-batch; n_ce/n_kd are the window's totals."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], rows=batch["rows"], cols=batch["cols"])
    ce, kd = response_loss_sums(logits, batch, cfg.temperature, cfg.kd_loss)
    # DDP averages gradients over processes; the window's normaliser already counts all of them.
    loss = combined_loss(ce, kd, n_ce, n_kd, cfg.alpha_ce, cfg.temperature) * world
    return loss, ce.detach(), kd.detach()


# --------------------------------------------------------------------------- training

@dataclass
class Position:
    """Where the data stream is: the next window to run."""

    epoch: int = 0
    window: int = 0
    step: int = 0


def train(cfg: TrainConfig, prep: Prepared | None = None) -> Path:
    """Train (or finish training) and return the final_model folder."""
    prep = prep or prepare(cfg)
    out = Path(cfg.output_dir)
    final = final_model_dir(out)
    if prep.already_done:
        log.info("%s already holds the trained model for these settings: nothing to do", final)
        return final
    accelerator = _accelerator(cfg)
    _log_examples(prep.stats, accelerator.is_main_process)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a save cut short by a kill
    accelerator.wait_for_everyone()

    loop = _Loop(cfg, prep, accelerator)
    loop.run()
    loop.save(final, final=True)
    accelerator.wait_for_everyone()
    return final


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_cpu = (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
               or not torch.cuda.is_available())
    mixed = "bf16" if cfg.dtype == "auto" and not use_cpu else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=use_cpu)
    set_seed(cfg.seed)
    return accelerator


def _log_examples(stats: ExampleStats, main: bool) -> None:
    if not main:
        return
    log.info("%d training items: %d with token-level KD, %d option-level only",
             stats.n_items - len(stats.skipped_too_long), stats.token_level, stats.option_only)
    for reason, n in stats.token_level_off.items():
        log.info("token-level KD off for %d items: %s", n, reason)
    if stats.skipped_too_long:
        log.warning("skipped %d items whose prompt does not fit in --max_length: %s", len(stats.skipped_too_long),
                    ", ".join(stats.skipped_too_long[:10]) + (" ..." if len(stats.skipped_too_long) > 10 else ""))
    if stats.truncated:
        log.warning("cut the response of %d items to fit in --max_length", stats.truncated)


class _Loop:
    """The model, optimizer, scheduler and data position of one training run."""

    def __init__(self, cfg: TrainConfig, prep: Prepared, accelerator):
        from transformers import get_scheduler

        from .models import load_model

        self.cfg, self.prep, self.acc = cfg, prep, accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.examples = prep.examples
        # Placeholder items (which fill the last micro-batch) reuse the shortest example at weight 0.
        self.placeholder = min(range(len(self.examples)), key=lambda i: len(self.examples[i].input_ids))
        n_micro = math.ceil(len(self.examples) / (cfg.batch_size * self.world))
        self.windows_per_epoch = math.ceil(n_micro / cfg.gradient_accumulation_steps)
        self.total_steps = self.windows_per_epoch * cfg.num_epochs

        source = prep.resume_from or cfg.student_model_path
        weights_dtype = "bf16" if cfg.dtype == "bf16" else "fp32"
        model = load_model(source, torch.device("cpu"), weights_dtype, cfg.trust_remote_code)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = HeadAtPositions(model, len(prep.tokenizer))
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        # Not prepared by accelerate: it would step the schedule once per process.
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.pos = Position()
        self.log_history: list[dict] = []
        if prep.resume_from is not None:
            self._restore(prep.resume_from, prep.resume_state)

    # ---- the loop

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            log.info("training: %d processes x %d items x %d micro-batches per step; %d steps (%d per epoch)",
                     self.world, cfg.batch_size, cfg.gradient_accumulation_steps, self.total_steps,
                     self.windows_per_epoch)
        bar = tqdm(total=self.total_steps, initial=self.pos.step, desc="train", unit="step",
                   disable=not acc.is_main_process)
        running = torch.zeros(4, dtype=torch.float64)  # CE sum, KD sum, CE tokens, KD positions since last log
        for epoch in range(self.pos.epoch, cfg.num_epochs):
            micro = epoch_micro_batches(len(self.examples), cfg.batch_size, self.world, cfg.seed, epoch)
            windows = [micro[i:i + cfg.gradient_accumulation_steps]
                       for i in range(0, len(micro), cfg.gradient_accumulation_steps)]
            start = self.pos.window if epoch == self.pos.epoch else 0
            for w in range(start, len(windows)):
                running += self._step(windows[w])
                self.pos = Position(epoch, w + 1, self.pos.step + 1)
                if w + 1 == len(windows):
                    self.pos = Position(epoch + 1, 0, self.pos.step)
                bar.update(1)
                if self.pos.step % cfg.logging_steps == 0 or self.pos.step == self.total_steps:
                    self._log(running, bar)
                    running.zero_()
                if self.pos.step % cfg.save_steps == 0 and self.pos.step < self.total_steps:
                    self.save(checkpoint_dir(cfg.output_dir, self.pos.step))
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
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss, ce, kd = micro_batch_loss(self.model, batch, n_ce, n_kd, cfg, self.world)
                acc.backward(loss)
            sums += torch.stack([ce.double().cpu(), kd.double().cpu()])
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Counts are already global: each process reports its share so the log's sum over processes is exact.
        return torch.cat([sums, torch.tensor([n_ce, n_kd], dtype=torch.float64) / self.world])

    def _local_batch(self, micro_batch: list[int]) -> dict[str, torch.Tensor]:
        idx = local_slice(micro_batch, self.cfg.batch_size, self.rank)
        examples = [self.examples[i if i >= 0 else self.placeholder] for i in idx]
        weights = [1.0 if i >= 0 else 0.0 for i in idx]
        batch = collate(examples, weights, self.prep.tokenizer.pad_token_id)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _log(self, running: torch.Tensor, bar) -> None:
        total = self.acc.reduce(running.to(self.acc.device), reduction="sum").cpu()
        ce = float(total[0] / max(total[2], 1.0))
        kd = float(total[1] / max(total[3], 1.0))
        loss = self.cfg.alpha_ce * ce + (1 - self.cfg.alpha_ce) * self.cfg.temperature ** 2 * kd
        entry = {"step": self.pos.step, "epoch": self.pos.epoch, "loss": loss, "ce": ce, "kd": kd,
                 "lr": self.scheduler.get_last_lr()[0]}
        self.log_history.append(entry)
        if self.acc.is_main_process:
            bar.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.4f}", kd=f"{kd:.4f}")
            log.info("step %d: loss %.4f (ce %.4f, kd %.4f), lr %.3g", entry["step"], loss, ce, kd, entry["lr"])

    # ---- checkpoints

    def save(self, folder: Path, final: bool = False) -> None:
        """Write `folder` completely under a temp name, then rename it (all processes call this)."""
        acc = self.acc
        folder = Path(folder)
        tmp = folder.with_name(f".tmp-{folder.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if not final:
            write_bytes(tmp / f"rng-{self.rank}.safetensors", _st_bytes(_rng_state()))
        if acc.is_main_process:
            model = acc.unwrap_model(self.model).model
            model.save_pretrained(str(tmp), safe_serialization=True)
            self.prep.tokenizer.save_pretrained(str(tmp))
            if not final:
                tensors, meta = _optimizer_parts(self.optimizer.state_dict())
                write_bytes(tmp / "optimizer.safetensors", _st_bytes(tensors))
                write_json(tmp / "optimizer.json", meta)
                write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            state = {"global_step": self.pos.step, "epoch": self.pos.epoch, "window": self.pos.window,
                     "world_size": self.world, "total_steps": self.total_steps,
                     "fingerprint": self.prep.fingerprint, "log_history": self.log_history,
                     "examples": asdict(self.prep.stats)}
            write_json(tmp / STATE_FILE, state)  # last: marks the folder complete
        acc.wait_for_everyone()
        if acc.is_main_process:
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            log.info("saved %s", folder)
            if not final:
                self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        limit = self.cfg.save_total_limit
        ckpts = complete_checkpoints(self.cfg.output_dir)
        if limit > 0 and len(ckpts) > limit:
            for old in ckpts[: len(ckpts) - limit]:
                shutil.rmtree(old, ignore_errors=True)
                log.info("removed %s (--save_total_limit %d)", old, limit)

    def _restore(self, folder: Path, state: dict) -> None:
        from safetensors.torch import load_file

        if state.get("world_size") != self.world:
            log.warning("%s was written by %s processes, this run has %d: the data order after it differs "
                        "from an uninterrupted run", folder, state.get("world_size"), self.world)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        self.optimizer.load_state_dict(_optimizer_state(tensors, read_json(folder / "optimizer.json")))
        self.scheduler.load_state_dict(read_json(folder / "scheduler.json"))
        rng = folder / f"rng-{self.rank}.safetensors"
        if rng.is_file():
            _set_rng_state(load_file(str(rng)))
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


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _optimizer_parts(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as safetensors tensors (`<param>.<name>`) plus JSON for the rest."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

