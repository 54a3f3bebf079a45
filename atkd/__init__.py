"""AT-KD: ability-tree guided knowledge distillation.

The stage scripts at the repository root are thin command-line wrappers over this package;
each module here holds one idea (records, jsonl io, the ability tree, prompts, ...).
"""

__version__ = "0.1.0"
