"""Create the initial ability tree by asking an LLM for sub-abilities, level by level.

    python create_initial_tree.py --model_path /models/Qwen2.5-7B-Instruct --domain 临床医学 --nodes_per_level 6,4

or against an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, a hosted API; the key
is read from the environment variable named by --api_key_env):

    python create_initial_tree.py --api_base http://127.0.0.1:8000/v1 --api_model Qwen2.5-7B-Instruct --domain 临床医学

The constants below are the defaults; every one can be overridden by the flag of the same name.
The tree is written (atomically) to OUTPUT_DIR/OUTPUT_FILENAME in the nested form
`{"domain": {"level 1": {"level 2": {}}}}`, with the arguments beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from atkd.api import APIError, ChatAPI
from atkd.errors import InputError, exit_on_input_error
from atkd.generation import generate_batch
from atkd.models import check_model_dir, device_for, load_model, load_tokenizer, set_quiet_env, usable_gpu_ids
from atkd.prompts import detect_language, encode_prompt, render
from atkd.stage import record_args, setup_logging
from atkd.tree_builder import TreeBuildError, build_tree, parse_nodes_per_level

MODEL_PATH = "./models/teacher"          # local Hugging Face model folder of the LLM that writes the tree
DOMAIN = "临床医学"                       # the tree's root: the domain (here "clinical medicine")
OUTPUT_DIR = "./ability_trees"
OUTPUT_FILENAME = "initial_tree.json"
GPU_ID = 0                               # CUDA device of the local model; -1 (or no GPU) = CPU
NODES_PER_LEVEL = [6, 4]                 # 6 level-1 abilities, 4 children under each: depth = len(list)
MAX_RETRIES = 3                          # extra asks for a node that got too few names
MAX_NEW_TOKENS = 256                     # per reply
TEMPERATURE = 0.0                        # 0 = greedy; retries then sample at RETRY_TEMPERATURE
RETRY_TEMPERATURE = 0.7                  # a greedy retry would repeat the same reply
SEED = 0

log = logging.getLogger("create_initial_tree")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=MODEL_PATH, help="local model folder (ignored with --api_base)")
    p.add_argument("--domain", default=DOMAIN, help="the domain: the tree's root and the prompts' subject")
    p.add_argument("--output_dir", default=OUTPUT_DIR)
    p.add_argument("--output_filename", default=OUTPUT_FILENAME)
    p.add_argument("--gpu_id", type=int, default=GPU_ID, help="CUDA device id; -1 = CPU (CPU also when no GPU)")
    p.add_argument("--nodes_per_level", default=",".join(map(str, NODES_PER_LEVEL)),
                   help="children per node at each level, comma-separated (e.g. 6,4)")
    p.add_argument("--max_retries", type=int, default=MAX_RETRIES,
                   help="extra asks for a node that got too few names (then it keeps what it has)")
    p.add_argument("--lang", default="auto", choices=["auto", "en", "zh"],
                   help="prompt language; auto = zh when the domain name is Chinese")
    p.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help=f"0 = greedy (retries then sample at {RETRY_TEMPERATURE})")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="local model weights dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoint folder")
    p.add_argument("--api_base", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api_model", default=None, help="model name the server knows (required with --api_base)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    return p.parse_args(argv)


def checked_settings(args) -> tuple[list[int], str]:
    """Validated (nodes per level, prompt language); bad settings raise InputError."""
    try:
        levels = parse_nodes_per_level(args.nodes_per_level)
    except ValueError:
        raise InputError(None, "--nodes_per_level must be positive integers like 6,4 "
                               f"(got {args.nodes_per_level!r})") from None
    if not args.domain.strip():
        raise InputError(None, "--domain must not be empty")
    if args.max_retries < 0 or args.max_new_tokens < 1:
        raise InputError(None, "--max_retries must be >= 0 and --max_new_tokens >= 1")
    if args.api_base and not args.api_model:
        raise InputError(None, "--api_base needs --api_model (the model name the server serves)")
    lang = detect_language([args.domain]) if args.lang == "auto" else args.lang
    return levels, lang


def retry_temperature(temperature: float, attempt: int) -> float:
    return temperature if attempt == 0 or temperature > 0 else RETRY_TEMPERATURE


def api_asker(args):
    """ask(prompts, attempt) through an OpenAI-compatible server (the server applies the chat template)."""
    api = ChatAPI(base_url=args.api_base, model=args.api_model, api_key_env=args.api_key_env)
    log.info("asking %s (model %s)", args.api_base, args.api_model)

    def ask(prompts: list[str], attempt: int) -> list[str]:
        return api.chat_many(prompts, args.max_new_tokens, retry_temperature(args.temperature, attempt),
                             seeds=[args.seed + attempt] * len(prompts))
    return ask


def local_asker(args):
    """ask(prompts, attempt) with a local model: one batched generate call per level, chat template."""
    gpus = usable_gpu_ids([args.gpu_id]) if args.gpu_id >= 0 else []
    device = device_for(gpus[0] if gpus else None)
    tok = load_tokenizer(args.model_path, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model_path, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    log.info("loaded %s on %s", args.model_path, device)

    def ask(prompts: list[str], attempt: int) -> list[str]:
        ids = [encode_prompt(tok, render(tok, p)) for p in prompts]
        return generate_batch(model, tok, ids, args.max_new_tokens, retry_temperature(args.temperature, attempt),
                              seed=args.seed + attempt)
    return ask


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    set_quiet_env()
    out_path = Path(args.output_dir) / args.output_filename
    with exit_on_input_error():
        levels, lang = checked_settings(args)
        if not args.api_base:
            check_model_dir(args.model_path)
        ask = api_asker(args) if args.api_base else local_asker(args)
    try:
        tree, shortfalls = build_tree(ask, args.domain.strip(), levels, lang, args.max_retries)
    except (APIError, TreeBuildError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    tree.save_nested(out_path)
    record_args(args, out_path)
    depth_counts = [sum(1 for n in tree.nodes() if len(n.path) == d + 1) for d in range(1, len(levels) + 1)]
    log.info("wrote %s: %s nodes per level (asked %s), %d shortfall(s)", out_path, depth_counts,
             [levels[0]] + [a * b for a, b in zip(depth_counts, levels[1:])], len(shortfalls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
