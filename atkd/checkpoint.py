"""Checkpoints of train.py (step F): written whole or not at all, read back without pickle.

A checkpoint (`checkpoint-<step>/`) holds the model (safetensors) and tokenizer, the optimizer
(safetensors tensors + JSON scalars), the scheduler (JSON), each process's RNG state and the
trainer state (position in the data, fingerprint, loss history). It is written into a hidden
temp folder and renamed when complete; `trainer_state.json` is written last, so a folder with one
is complete. `final_model/` is written the same way, without optimizer and RNG.
"""

from __future__ import annotations

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


def write_checkpoint(acc, folder: Path, model, tokenizer, state: dict, optimizer=None, scheduler=None) -> None:
    """Write `folder` completely under a temp name, then rename it (every process calls this).

    With an optimizer it is a resumable checkpoint (optimizer, scheduler, per-process RNG);
    without, a plain Hugging Face model folder plus the trainer state (final_model).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if optimizer is not None:
        write_bytes(tmp / f"rng-{acc.process_index}.safetensors", _st_bytes(_rng_state()))
    if acc.is_main_process:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if optimizer is not None:
            tensors, meta = _optimizer_parts(optimizer.state_dict())
            write_bytes(tmp / "optimizer.safetensors", _st_bytes(tensors))
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "scheduler.json", scheduler.state_dict())
        write_json(tmp / STATE_FILE, state)  # last: marks the folder complete
    acc.wait_for_everyone()
    if acc.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        log.info("saved %s", folder)
    acc.wait_for_everyone()


def read_checkpoint(folder: Path, optimizer, scheduler, rank: int) -> dict:
    """Restore the optimizer, the scheduler and this process's RNG from `folder`; returns its trainer state."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_state(tensors, read_json(folder / "optimizer.json")))
    scheduler.load_state_dict(read_json(folder / "scheduler.json"))
    rng = folder / f"rng-{rank}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)))
    return trainer_state(folder)


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
