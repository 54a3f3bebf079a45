"""Checkpoints of train.py (step F): written whole or not at all, read back without pickle.

A checkpoint (`checkpoint-<step>/`) holds the trainable weights, the optimizer, the scheduler
(JSON), each process's RNG state, the tokenizer and the trainer state (position in the data,
fingerprint, loss history). Two layouts, by how the run is spread (`atkd.distributed`):
- unsharded (one process, DDP): the model as a Hugging Face folder (LoRA: `adapter.safetensors`,
  the adapters alone), the optimizer as safetensors tensors + JSON scalars, RNG as safetensors;
  nothing is read back with pickle;
- sharded (FSDP2, DeepSpeed ZeRO): accelerate's `save_state`, each process writing its own shards
  of model and optimizer (torch.distributed.checkpoint or DeepSpeed's files) and its RNG state.
  These are read back by accelerate's `load_state` (torch.load / DCP metadata): they are files
  this stage wrote itself, found by its own fingerprint, never a user's input.
Either way the folder is written under a hidden temp name and renamed when complete, and
`trainer_state.json` is written last, so a folder with one is complete. `final_model/` is written
the same way: a plain Hugging Face folder gathered from the shards, plus the trainer state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .io import read_json, write_bytes, write_json
from .paths import CHECKPOINT_PREFIX

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # written last into a checkpoint / final_model
SCHEDULER_FILE = "scheduler.json"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-<step>/` folders, oldest first (temp folders of a killed save are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def trainer_state(folder: Path) -> dict:
    return read_json(folder / STATE_FILE)


@contextlib.contextmanager
def staged_folder(acc, folder: Path, state: dict | None = None):
    """Yield a temp folder every process writes its part into; then `state` goes in last and the
    folder is renamed to `folder` (every process enters this; the main process renames)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    yield tmp
    acc.wait_for_everyone()
    if acc.is_main_process:
        if state is not None:
            write_json(tmp / STATE_FILE, state)  # last: marks the folder complete
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        log.info("saved %s", folder)
    acc.wait_for_everyone()


def write_training_state(acc, folder: Path, optimizer, scheduler) -> None:
    """Unsharded runs: the optimizer (safetensors + JSON), the scheduler (JSON) and each process's RNG."""
    write_bytes(folder / f"rng-{acc.process_index}.safetensors", _st_bytes(_rng_state()))
    if acc.is_main_process:
        tensors, meta = _optimizer_parts(optimizer.state_dict())
        write_bytes(folder / "optimizer.safetensors", _st_bytes(tensors))
        write_json(folder / "optimizer.json", meta)
        write_json(folder / SCHEDULER_FILE, scheduler.state_dict())


def read_training_state(folder: Path, optimizer, scheduler, rank: int) -> None:
    """Restore what `write_training_state` wrote: the optimizer, the scheduler and this process's RNG."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_state(tensors, read_json(folder / "optimizer.json")))
    scheduler.load_state_dict(read_json(folder / SCHEDULER_FILE))
    rng = folder / f"rng-{rank}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)))


def write_sharded_state(acc, folder: Path, scheduler) -> None:
    """FSDP2 / DeepSpeed: model and optimizer shards and RNG through accelerate's `save_state`
    (each process writes its own shards), the scheduler as JSON."""
    acc.save_state(str(folder))
    if acc.is_main_process:
        write_json(folder / SCHEDULER_FILE, scheduler.state_dict())


def read_sharded_state(acc, folder: Path, scheduler) -> None:
    """Restore what `write_sharded_state` wrote into the prepared model and optimizer."""
    acc.load_state(str(folder))
    scheduler.load_state_dict(read_json(folder / SCHEDULER_FILE))


def prune(output_dir: str | Path, limit: int) -> None:
    """Keep the newest `limit` checkpoints (all when limit <= 0)."""
    ckpts = complete_checkpoints(output_dir)
    if limit > 0 and len(ckpts) > limit:
        for old in ckpts[: len(ckpts) - limit]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s (--save_total_limit %d)", old, limit)


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
