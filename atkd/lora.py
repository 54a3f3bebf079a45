"""Optional LoRA training of the student (step F, `--lora_r > 0`): adapters in, a merged plain model out.

peft is an optional dependency, imported only when LoRA is asked for (`pip install peft`). The
adapters are injected into the student's own modules (`get_peft_model` wraps the model in place),
so the distillation loss runs through `atkd.head.HeadAtPositions` on the adapted model exactly as
in full fine-tuning; only the adapters train, the base weights are frozen.

The trained student is written twice: `final_model/`, the adapters merged into the student's fp32
weights (a plain Hugging Face folder: the next iteration and inference.py load it without peft),
and `final_adapter/`, the adapters alone in peft's format. The merge is done on the main process
on a fresh CPU copy of the student (so it is the same under DDP, FSDP2 and ZeRO, whose trained
module may hold shards), with peft's own `merge_and_unload`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

ALL_LINEAR = "all-linear"  # peft: every Linear layer except the output head
LORA_MARK = ".lora_"  # in the names of adapter weights (lora_A, lora_B)


def require_peft():
    """The peft module, or InputError saying how to get it."""
    try:
        import peft
    except ImportError:
        raise InputError(None, "--lora_r > 0 needs peft, an optional dependency: pip install peft "
                               "(or --lora_r 0 for full fine-tuning)") from None
    return peft


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str]):
    """peft's LoraConfig for these settings (`all-linear` alone means every Linear but the head)."""
    peft = require_peft()
    targets = ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                           task_type="CAUSAL_LM")


def add_adapters(model, config):
    """Inject LoRA adapters into `model` in place (its other weights frozen); returns peft's wrapper."""
    peft = require_peft()
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise InputError(None, f"--lora_target_modules: {exc}") from None


def check_targets(model_dir: str | Path, config, trust_remote_code: bool = False) -> None:
    """InputError unless the LoRA settings apply to this model (checked on an empty copy: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .distributed import loading_whole

    model_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with loading_whole(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    add_adapters(skeleton, config)


def adapter_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a (peft-injected) model's state dict."""
    return {k: v for k, v in state_dict.items() if LORA_MARK in k}


def load_adapter_weights(model, weights: dict[str, torch.Tensor], source) -> None:
    """Put saved adapter tensors back into an adapted model (every adapter weight must be there)."""
    expected = set(adapter_weights(model.state_dict()))
    if set(weights) != expected:
        raise InputError(source, f"adapter weights do not match the LoRA settings ({len(set(weights) ^ expected)} "
                                 "names differ)")
    model.load_state_dict(weights, strict=False)


def write_merged(model_dir: Path, adapter_dir: Path, student_path: str, config, weights: dict[str, torch.Tensor],
                 tokenizer, trust_remote_code: bool = False) -> None:
    """The adapters in `weights` (a full state dict of the adapted model) written to `adapter_dir`, and
    merged into a fresh copy of the student written to `model_dir` (a plain Hugging Face folder)."""
    from .distributed import loading_whole
    from .models import load_model

    with loading_whole():  # this process alone, whatever the training backend
        student = load_model(student_path, torch.device("cpu"), "fp32", trust_remote_code)
    wrapped = add_adapters(student, config)
    load_adapter_weights(student, adapter_weights(weights), student_path)
    wrapped.save_pretrained(str(adapter_dir), safe_serialization=True)
    merged = wrapped.merge_and_unload()
    merged.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
