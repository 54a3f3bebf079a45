"""Build the embedded demo: its data files, its ability tree and its three tiny models, from a seed.

    python data/build_demo.py --seed 0 --threads 1

Writes data/demo/{iteration_1,iteration_2,eval}.jsonl and their *_ability_paths.jsonl,
ability_trees/demo_tree.json, and data/demo/models/{teacher,agent,student} (fp16 safetensors,
loaded as fp32 on the CPU), then measures the models with the pipeline's own code and prints the
figures (also written to data/demo/models/build_report.json). `--data_only` skips the models.
The same seed, torch version and thread count rebuild the same files. The recipe (vocabulary,
question generator, training loop) is data/demo_recipe.py.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import demo_recipe as demo  # beside this script

from atkd.cli import Check, StageConfig, at_least, parse_config, setting, setup_logging, to_argv
from atkd.errors import exit_on_input_error

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(kw_only=True)
class BuildConfig(StageConfig):
    """build_demo.py: the demo's data, tree and models."""

    seed: int = setting(0, help="seed of the data, the tokenizer and every model")
    data_dir: str = setting(str(demo.DATA_DIR), help="where the question and ability-path files go")
    tree_path: str = setting(str(demo.TREE_PATH), help="where the demo ability tree goes")
    models_dir: str = setting(str(demo.MODELS_DIR), help="where teacher/, agent/ and student/ go")
    data_only: bool = setting(False, help="write the data files and the tree, build no model")
    models: list[str] = setting(list(demo.MODEL_NAMES), check=Check(lambda v: set(v) <= set(demo.MODEL_NAMES),
                                                                 "among " + ", ".join(demo.MODEL_NAMES)),
                                help="which models to build (the others in --models_dir are kept and measured)")
    measure_only: bool = setting(False, help="build nothing: measure the models in --models_dir and write the report")
    dtype: str = setting("fp16", choices=DTYPES, help="dtype the weights are saved in")
    threads: int = setting(2, check=at_least(1), help="torch CPU threads (results depend on it)")
    check_per_leaf: int = setting(16, check=at_least(1),
                                  help="questions the teacher writes per leaf when measuring the pass rate")


def main(argv=None) -> int:
    import torch

    from atkd.fingerprint import versions
    from atkd.io import read_json, write_json
    from atkd.paths import args_path
    from atkd.console import set_quiet_env

    setup_logging()
    set_quiet_env()
    log = logging.getLogger("build_demo")
    with exit_on_input_error():
        cfg = parse_config(BuildConfig, argv, __doc__)
        torch.set_num_threads(cfg.threads)
        written = demo.write_data(cfg.data_dir, cfg.tree_path, demo.DataConfig(seed=cfg.seed))
        log.info("wrote %d data files: %s", len(written), ", ".join(str(p) for p in written))
        if cfg.data_only:
            return 0
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
        report = Path(cfg.models_dir) / "build_report.json"
        built = read_json(report).get("build_seconds", {}) if report.is_file() else {}
        built = built if isinstance(built, dict) else {}  # older reports held one total
        if not cfg.measure_only:
            for name in cfg.models:  # one at a time, so each model's build time is its own
                start = time.time()
                demo.build_models(cfg.models_dir, seed=cfg.seed, dtype=dtype, names=(name,))
                built[name] = round(time.time() - start, 1)
                log.info("built the %s in %.0f s", name, built[name])
            write_json(args_path(report),
                       {"argv": [sys.argv[0], *to_argv(cfg)], "versions": versions()})
        log.info("measuring the models in %s", cfg.models_dir)
        fig = demo.demo_figures(cfg.models_dir, cfg.data_dir, per_leaf=cfg.check_per_leaf, seed=cfg.seed)
        fig["build_seconds"] = built
        fig["threads"] = cfg.threads
        write_json(report, fig)
        print(demo.figures_table(fig))
        print(f"build times {built} s with {cfg.threads} thread(s); figures in {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
