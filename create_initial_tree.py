"""Create the initial ability tree by asking an LLM for sub-abilities, level by level.

    python create_initial_tree.py --model_path /models/Qwen2.5-7B-Instruct --domain 临床医学 --nodes_per_level 6,4

or against an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, a hosted API; the key
is read from the environment variable named by --api_key_env):

    python create_initial_tree.py --api_base http://127.0.0.1:8000/v1 --api_model Qwen2.5-7B-Instruct --domain 临床医学

The constants below are the defaults of their flags (GPU_ID is --gpu_ids; -1 is the CPU); the
other settings and their defaults are listed by --help. The tree is written (atomically) to
OUTPUT_DIR/OUTPUT_FILENAME in the nested form `{"domain": {"level 1": {"level 2": {}}}}`, with its
done-record beside it.
"""

MODEL_PATH = "./models/teacher"          # local Hugging Face model folder of the LLM that writes the tree
DOMAIN = "临床医学"                       # the tree's root: the domain (here "clinical medicine")
OUTPUT_DIR = "./ability_trees"
OUTPUT_FILENAME = "initial_tree.json"
GPU_ID = 0                               # CUDA device of the local model; -1 (or no GPU) = CPU


def main(argv=None) -> int:
    from atkd.cli import stage_main
    from atkd.tree_building import TreeConfig, run

    defaults = dict(model_path=MODEL_PATH, domain=DOMAIN, output_dir=OUTPUT_DIR, output_filename=OUTPUT_FILENAME,
                    gpu_ids=[GPU_ID] if GPU_ID >= 0 else [])
    return stage_main(TreeConfig, run, argv, __doc__, defaults)


if __name__ == "__main__":
    raise SystemExit(main())
