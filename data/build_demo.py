"""Build the embedded demo: its data files, its ability tree and its three tiny models, from a seed.

    python data/build_demo.py --seed 0

Writes data/demo/{iteration_1,iteration_2,eval}.jsonl and their *_ability_paths.jsonl,
ability_trees/demo_tree.json, and data/demo/models/{teacher,agent,student} (fp16 safetensors,
loaded as fp32 on the CPU), then measures the models with the pipeline's own code and prints the
figures (also written to data/demo/models/build_report.json). `--data_only` skips the models.
The same seed, torch version and thread count rebuild the same files.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

DTYPES = ("fp16", "bf16", "fp32")


def parse_args(argv=None) -> argparse.Namespace:
    from atkd import demo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer and every model")
    p.add_argument("--data_dir", default=str(demo.DATA_DIR), help="where the question and ability-path files go")
    p.add_argument("--tree_path", default=str(demo.TREE_PATH), help="where the demo ability tree goes")
    p.add_argument("--models_dir", default=str(demo.MODELS_DIR), help="where teacher/, agent/ and student/ go")
    p.add_argument("--data_only", action="store_true", help="write the data files and the tree, build no model")
    p.add_argument("--dtype", default="fp16", choices=DTYPES, help="dtype the weights are saved in")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    p.add_argument("--check_per_leaf", type=int, default=16,
                   help="questions the teacher writes per leaf when measuring the pass rate")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from atkd import demo
    from atkd.errors import exit_on_input_error
    from atkd.io import write_json
    from atkd.models import set_quiet_env
    from atkd.stage import record_args, setup_logging

    setup_logging()
    set_quiet_env()
    log = logging.getLogger("build_demo")
    with exit_on_input_error():
        torch.set_num_threads(args.threads)
        written = demo.write_data(args.data_dir, args.tree_path, demo.DataConfig(seed=args.seed))
        log.info("wrote %d data files: %s", len(written), ", ".join(str(p) for p in written))
        if args.data_only:
            return 0
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        start = time.time()
        demo.build_models(args.models_dir, seed=args.seed, dtype=dtype)
        build_s = time.time() - start
        log.info("built the models in %.0f s; measuring them", build_s)
        fig = demo.demo_figures(args.models_dir, args.data_dir, per_leaf=args.check_per_leaf, seed=args.seed)
        fig["build_seconds"] = round(build_s, 1)
        fig["threads"] = args.threads
        report = Path(args.models_dir) / "build_report.json"
        write_json(report, fig)
        record_args(args, report)
        print(demo.figures_table(fig))
        print(f"build time {build_s:.0f} s with {args.threads} thread(s); figures in {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
