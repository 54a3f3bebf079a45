"""Create the initial ability tree by asking an LLM for sub-abilities, level by level.

An alias of `python -m atkd tree` whose flags default to the constants below (GPU_ID is --gpu_ids;
-1 is the CPU); `python create_initial_tree.py --help` shows a command to copy and every flag.
"""

MODEL_PATH = "./models/teacher"          # local Hugging Face model folder of the LLM that writes the tree
DOMAIN = "临床医学"                       # the tree's root: the domain (here "clinical medicine")
OUTPUT_DIR = "./ability_trees"
OUTPUT_FILENAME = "initial_tree.json"
GPU_ID = 0                               # CUDA device of the local model; -1 (or no GPU) = CPU


def main(argv=None) -> int:
    from atkd.__main__ import run_stage

    defaults = dict(model_path=MODEL_PATH, domain=DOMAIN, output_dir=OUTPUT_DIR, output_filename=OUTPUT_FILENAME,
                    gpu_ids=[GPU_ID] if GPU_ID >= 0 else [])
    return run_stage("tree", argv, defaults)


if __name__ == "__main__":
    raise SystemExit(main())
