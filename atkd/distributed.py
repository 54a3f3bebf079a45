"""How train.py (step F) runs under accelerate: precision, the backend, DeepSpeed's numbers, the full weights.

The user's accelerate config file (or `accelerate launch` flags) decides how training is spread:
one process, DDP, FSDP2 or DeepSpeed ZeRO, and the precision. train.py's own settings decide the
training arithmetic (batch, accumulation, clipping), whatever the backend. This module is where
the two meet:

- precision: the master weights and AdamW state are always fp32 (bf16 weights round AdamW
  updates of ~lr away: at |w| ~ 0.02 one bf16 step is 1.2e-4, a 5e-6 update is lost); compute is
  bf16 autocast where asked. Under `accelerate launch` the launch (its --mixed_precision flag or
  config file) decides and `--dtype` must agree with it or be `auto`; a plain `python train.py`
  gets bf16 autocast on a GPU and fp32 on the CPU (`--dtype` overrides);
- the backend: an FSDP or DeepSpeed request that accelerate did not honour (it runs FSDP only on
  GPUs, and falls back to unsharded data parallelism elsewhere) is refused, so a config never
  silently trains unsharded; FSDP version 1 is refused (train.py uses accelerate's FSDP2);
- DeepSpeed: its config receives train.py's micro-batch, accumulation and clipping, and ZeRO-3
  gathers 16-bit weights on save (final_model is written from them);
- the full weights for final_model: gathered from the shards onto the main process.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .errors import InputError

log = logging.getLogger(__name__)

LAUNCH_PRECISION = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from its flag or config file
DTYPE_TO_PRECISION = {"bf16": "bf16", "fp32": "no"}


def mixed_precision_arg(dtype: str, on_gpu: bool) -> str | None:
    """`Accelerator(mixed_precision=...)`: None where `accelerate launch` decided it (its value is read from the env)."""
    launched = os.environ.get(LAUNCH_PRECISION)
    wanted = DTYPE_TO_PRECISION.get(dtype)
    if launched is not None:
        if wanted is not None and launched != wanted:
            raise InputError(None, f"--dtype {dtype} asks for mixed precision {wanted!r}, but accelerate launch was "
                                   f"told {launched!r} (its --mixed_precision flag or config file): make them agree, "
                                   "or leave --dtype auto")
        return None
    if wanted is not None:
        return wanted
    return "bf16" if on_gpu else "no"


def make_accelerator(dtype: str, gradient_accumulation_steps: int, **trackers):
    """The run's Accelerator, after checking that the requested backend is the one running.
    `trackers`: its experiment-tracking arguments (log_with, project_dir; `atkd.tracking`)."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    # cpu=True on a machine without CUDA: under a launcher accelerate then runs gloo data parallelism
    # (without it every process would train alone).
    acc = Accelerator(mixed_precision=mixed_precision_arg(dtype, on_gpu), cpu=not on_gpu,
                      gradient_accumulation_steps=gradient_accumulation_steps, **trackers)
    check_backend(acc)
    return acc


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_backend(acc) -> None:
    """InputError when the launch asked for FSDP/DeepSpeed and accelerate runs something else."""
    from accelerate.utils import DistributedType

    running = acc.distributed_type
    for flag, kind, name in (("ACCELERATE_USE_FSDP", DistributedType.FSDP, "FSDP"),
                             ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED, "DeepSpeed")):
        if _env_flag(flag) and running != kind:
            raise InputError(None, f"the accelerate config asks for {name}, but accelerate runs this job as "
                                   f"{running.value} (accelerate {_version()} shards only on GPUs): training would "
                                   "not be sharded; use a GPU machine or a config without sharding")
    if running == DistributedType.FSDP and not acc.is_fsdp2:
        raise InputError(None, "FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config "
                               "(see configs/accelerate/fsdp2.yaml)")


def _version() -> str:
    import accelerate

    return accelerate.__version__


def backend_name(acc) -> str:
    """'fsdp2', 'deepspeed-zero<N>', 'ddp' or 'single': what a checkpoint was written under."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{acc.state.deepspeed_plugin.zero_stage}"
    return "ddp" if acc.num_processes > 1 else "single"


def is_sharded(acc) -> bool:
    """Model or optimizer state split over processes: checkpoints go through accelerate's save_state."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fill_deepspeed_config(acc, batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float) -> None:
    """Give DeepSpeed train.py's micro-batch, accumulation and clipping (before `prepare`); no-op elsewhere.

    These are train.py's settings whatever the DeepSpeed config says (`accelerate config` writes
    `gradient_accumulation_steps: 1` into it): a differing value is replaced, and logged.
    The optimizer and schedule are train.py's too: a DeepSpeed config that brings its own is refused.
    """
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    for own in ("optimizer", "scheduler"):
        if own in ds:
            raise InputError(None, f"the DeepSpeed config sets an {own}; train.py brings its own AdamW and "
                                   "learning-rate schedule: remove it from the DeepSpeed config")
    ours = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
            "train_batch_size": batch_size * gradient_accumulation_steps * acc.num_processes,
            "gradient_clipping": max(float(max_grad_norm), 0.0)}  # 0: DeepSpeed does not clip
    for key, value in ours.items():
        old = ds.get(key, "auto")
        if old not in ("auto", value):
            log.info("DeepSpeed config: %s %s -> %s (train.py's setting)", key, old, value)
        ds[key] = value
    if acc.state.deepspeed_plugin.zero_stage == 3:
        # final_model is written from the gathered weights; without this ZeRO-3 refuses to gather them.
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def is_zero3(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3


def whole_params(acc, params):
    """A context in which ZeRO-3-partitioned `params` hold their whole values (read-only); no-op elsewhere.

    Under ZeRO-3 with `zero3_init_flag`, weights are partitioned while they load: a parameter
    outside a forward pass is an empty tensor (its real shape is `ds_shape`). Code that reads a
    shape at set-up (the head's vocabulary size) runs inside this. Every process must enter it.
    """
    if not is_zero3(acc):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


@contextlib.contextmanager
def loading_whole():
    """Inside, transformers builds models whole on this process, even while DeepSpeed runs.

    accelerate registers DeepSpeed's config with transformers, which then partitions every model
    it builds under ZeRO-3 (a collective step). The LoRA merge builds a CPU copy of the student on
    the main process alone, and the settings check builds an empty one: both must stay plain.
    """
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    if not is_initialized() or AcceleratorState().distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def gather_head_in_root(acc, root, model) -> None:
    """ZeRO-3: let DeepSpeed gather the output head's weights when `root` (the head-at-positions wrapper) runs.

    The wrapper reads the head's weight inside its own forward, not through the head module's,
    and ZeRO-3 only gathers a module's partitioned parameters around that module's own forward;
    DeepSpeed's `register_external_parameter` is its API for exactly this. No-op elsewhere.
    """
    if not is_zero3(acc):
        return
    import deepspeed

    for param in model.get_output_embeddings().parameters():
        deepspeed.zero.register_external_parameter(root, param)


def loss_scale(acc) -> float:
    """What each micro-batch's window-normalised loss is multiplied by before backward.

    The loss is already divided by the whole window's token counts on all processes; accelerate
    (or DeepSpeed's engine) divides it again by the accumulation steps, and data parallelism
    (DDP, FSDP, ZeRO) averages gradients over processes. Both are undone here, so the gradient is
    exactly that of one big batch.
    """
    return float(acc.num_processes * acc.gradient_accumulation_steps)


def full_state_dict(acc, model, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process (CPU tensors, keys without `prefix`); None elsewhere.

    Every process must call it: under FSDP2 and ZeRO-3 the shards are gathered collectively.
    """
    sd = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    return {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu() for k, v in sd.items()}
