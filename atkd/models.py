"""Loading models and tokenizers the same way in every stage (ARCHITECTURE.md §6).

bf16 on GPU and fp32 on CPU unless told otherwise; safetensors only (never pickle);
`trust_remote_code` off unless asked; tokenizers pad on the left (batched generation and
last-position scoring need the real tokens flush right) and always have a pad token.

Placement over several GPUs (`placement_plan`): a model that fits one GPU gets one worker per
GPU, each with a whole copy and a share of the work; a model that does not (a 72B teacher on
80 GB cards) is loaded once, spread over all the listed GPUs with `device_map="auto"` and a
`max_memory` that names only those GPUs (never the CPU or disk: offloading would be silently
slow). `--model_placement` forces either; `auto` decides from the weights' size on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Memory needed on top of the weights, as a factor of their size: activations, the KV cache of a
# generate batch, CUDA's workspace. A model whose safetensors bytes x this exceed a GPU's free
# memory does not fit that GPU; a spread model may fill each GPU up to free / this.
ACTIVATION_MARGIN = 1.25
GIB = 1024 ** 3


def usable_gpu_ids(gpu_ids: list[int]) -> list[int]:
    """The requested GPUs, or [] when this machine has no CUDA (the stage then runs on the CPU)."""
    if not gpu_ids or not torch.cuda.is_available():
        if gpu_ids:
            log.warning("no CUDA device available: running on the CPU instead of GPUs %s", gpu_ids)
        return []
    count = torch.cuda.device_count()
    bad = [g for g in gpu_ids if g >= count or g < 0]
    if bad:
        raise InputError(None, f"GPU ids {bad} do not exist (this machine has {count} GPU(s))")
    return gpu_ids


def device_for(gpu_id: int | None) -> torch.device:
    return torch.device(f"cuda:{gpu_id}") if gpu_id is not None else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on the CPU."""
    if name not in DTYPES:
        raise InputError(None, f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def check_model_dir(path: str | Path) -> Path:
    """A local model folder with a config.json, else `InputError` (nothing is downloaded)."""
    path = Path(path)
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise InputError(path, f"model folder not found{where}")
    if not (path / "config.json").is_file():
        raise InputError(path, "not a model folder (no config.json)")
    check_weight_files(path)
    return path


def has_model(path: str | Path) -> bool:
    """Whether `path` is a model folder `check_model_dir` accepts (a served model's folder may hold only its
    tokenizer, or be empty)."""
    if not path:
        return False
    try:
        check_model_dir(path)
    except InputError:
        return False
    return True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")  # any one will do


def check_tokenizer_dir(path: str | Path) -> Path:
    """A local folder holding a tokenizer (a model folder, or its tokenizer files alone), else `InputError`."""
    path = Path(path)
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise InputError(path, f"tokenizer folder not found{where}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(path, f"no tokenizer files here (one of {', '.join(TOKENIZER_FILES)})")
    return path


def check_weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files, each with a readable, complete header, else `InputError`.

    Reads only the headers (milliseconds even for sharded 70B checkpoints), so a truncated
    download fails here, before a stage writes anything, rather than deep inside a worker.
    Pickle weights (`*.bin`) are refused: models load with `use_safetensors=True`.
    """
    import json

    from safetensors import safe_open

    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(indexes[0], f"unreadable safetensors index ({exc})") from None
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise InputError(path, f"only pickle weights ({pickles[0]}); AT-KD loads safetensors: re-save the model "
                                   "with `save_pretrained` (safetensors is its default)")
        raise InputError(path, "no model weights (*.safetensors) in the folder")
    for f in files:
        if not f.is_file():
            raise InputError(f, "weight file listed in the safetensors index not found")
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError (or OSError)
            raise InputError(f, f"unreadable safetensors file, truncated or corrupt? ({exc})") from None
    return files


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, weights: bool = True):
    """The tokenizer of a local model folder (`weights=False`: a folder that may hold the tokenizer files
    alone, a served model's), left-padded, with a pad token."""
    from transformers import AutoTokenizer

    if weights:
        check_model_dir(path)
    else:
        check_tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise InputError(path, "tokenizer has no pad, eos or unk token to pad with")
    return tok


def _dtype_kwarg() -> str:
    """transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def weights_bytes(path: str | Path) -> int:
    """Bytes of the folder's safetensors weights (the files its index lists, when sharded)."""
    return sum(f.stat().st_size for f in check_weight_files(Path(path)))


def free_gpu_bytes(gpu_ids: list[int]) -> dict[int, int]:
    """Free memory per GPU now, in bytes (what other processes hold is not ours to use)."""
    return {g: torch.cuda.mem_get_info(g)[0] for g in gpu_ids}


def choose_placement(placement: str, need_bytes: int, free: dict[int, int]) -> str:
    """"per_gpu" (a whole copy per GPU) or "spread" (one copy over all of them) for a model of
    `need_bytes` of weights, given each GPU's free bytes; one GPU (or none) is always per_gpu."""
    if len(free) <= 1:
        return "per_gpu"
    if placement != "auto":
        return placement
    return "spread" if need_bytes * ACTIVATION_MARGIN > min(free.values()) else "per_gpu"


def spread_max_memory(free: dict[int, int]) -> dict[int, int]:
    """`max_memory` for `device_map="auto"`: only the listed GPUs, each up to its free memory
    less the activation margin (no "cpu" or "disk" key: nothing is offloaded)."""
    return {g: int(b / ACTIVATION_MARGIN) for g, b in free.items()}


def placement_plan(path: str | Path, gpu_ids: list[int], placement: str = "auto") -> tuple[list[int], list[int]]:
    """(GPUs that each run a worker with a whole copy, GPUs that one in-process copy is spread over):
    (gpu_ids, []) or ([], gpu_ids); ([], []) on the CPU. `InputError` when even all of them cannot hold it."""
    if len(gpu_ids) <= 1:
        return list(gpu_ids), []
    need, free = weights_bytes(path), free_gpu_bytes(gpu_ids)
    choice = choose_placement(placement, need, free)
    sizes = ", ".join(f"GPU {g} {b / GIB:.1f}" for g, b in free.items())
    if choice == "per_gpu":
        if need * ACTIVATION_MARGIN > min(free.values()):
            log.warning("%s: %.1f GiB of weights may not fit one GPU (GiB free: %s); --model_placement spread "
                        "would split it over them", path, need / GIB, sizes)
        return list(gpu_ids), []
    room = sum(spread_max_memory(free).values())
    if need > room:
        raise InputError(path, f"{need / GIB:.1f} GiB of weights do not fit GPUs {gpu_ids} even spread over all "
                               f"of them (GiB free: {sizes}; {ACTIVATION_MARGIN}x the weights is kept for "
                               "activations): list more GPUs, free them, or use a smaller model")
    log.info("%s: %.1f GiB of weights, spread over GPUs %s (GiB free: %s)", path, need / GIB, gpu_ids, sizes)
    return [], list(gpu_ids)


def load_model(path: str | Path, device: torch.device | None = None, dtype: str = "auto",
               trust_remote_code: bool = False, device_map: dict | str | None = None,
               max_memory: dict | None = None):
    """A causal LM in eval mode on `device` (or spread by `device_map` over several GPUs)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    quiet_transformers()
    device = device or torch.device("cpu")
    if device_map is not None and max_memory and all(isinstance(k, int) for k in max_memory):
        device = torch.device("cuda", next(iter(max_memory)))  # the dtype of GPUs (bf16), not of the CPU
    kwargs = {_dtype_kwarg(): resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code,
              "use_safetensors": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    return model


def load(path: str | Path, device: torch.device | None = None, dtype: str = "auto", trust_remote_code: bool = False,
         spread_over: list[int] | tuple[int, ...] = ()):
    """(model, tokenizer) of a local folder: the one way every stage loads a model. With
    `spread_over` (GPU ids, from `placement_plan`), one copy split over those GPUs instead of `device`."""
    if spread_over:
        model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, device_map="auto",
                           max_memory=spread_max_memory(free_gpu_bytes(list(spread_over))))
    else:
        model = load_model(path, device, dtype, trust_remote_code)
    return model, load_tokenizer(path, trust_remote_code)


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (differs from model.device when spread over GPUs)."""
    return model.get_input_embeddings().weight.device


def quiet_transformers() -> None:
    """No transformers progress bars in this process (read at import, the variable above may come too late)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
