"""What every stage script does the same way: logging, recording its arguments, versions."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

from .io import write_json
from .paths import args_path


def setup_logging(main_process: bool = True) -> None:
    """INFO on the main process, warnings only elsewhere (one voice per run)."""
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def record_args(args: argparse.Namespace, output_path: str | Path) -> Path:
    """Write the arguments a stage ran with next to its output (`<stem>.args.json`)."""
    path = args_path(output_path)
    write_json(path, {"argv": sys.argv, "args": vars(args), "versions": versions()})
    return path


def add_common_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every model-loading stage shares."""
    parser.add_argument("--gpu_ids", default="", help="comma-separated GPU ids, e.g. 0,1 (empty: CPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="weights dtype; auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow model code from the checkpoint folder (off by default)")
