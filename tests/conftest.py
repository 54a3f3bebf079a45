"""Shared fixtures: tiny real models built from a locally trained tokenizer, MCQ data, a CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from atkd.io import write_jsonl
from atkd.prompts import mcq_prompt, question_block
from atkd.records import question_from_dict
from atkd.tiny import build_model, save_model, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("heart lung liver kidney aspirin insulin metoprolol amoxicillin femur tibia nerve muscle virus "
         "bacteria fungus enzyme protein vein artery cell blood bone skin brain").split()


def make_questions(n: int, seed: int = 0, n_options: int = 4, id_prefix: str | None = None) -> list[dict]:
    """n synthetic four-option questions (valid records, deterministic from seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        letters = [chr(ord("A") + k) for k in range(n_options)]
        opts = rng.sample(WORDS, n_options)
        out.append({"id": f"{id_prefix}{i}" if id_prefix else i,
                    "question": f"Which of these is linked to the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?",
                    "options": dict(zip(letters, opts)), "answer_idx": rng.choice(letters),
                    "meta_info": "synthetic"})
    return out


def corpus(questions: list[dict]) -> list[str]:
    texts = []
    for q in questions:
        texts.append(question_block(question_from_dict(q), "en", with_answer=True))
    return texts


@pytest.fixture(scope="session")
def questions() -> list[dict]:
    return make_questions(40, seed=1)


def _build(tmp_path_factory, name: str, style: str, chat: bool, family: str, seed: int) -> Path:
    qs = make_questions(200, seed=7)
    tok = train_tokenizer(corpus(qs), vocab_size=400, style=style, chat=chat)
    # A prompt rendered once makes sure the template words are in the training text too.
    extra = [mcq_prompt(tok, question_from_dict(q), "en") for q in qs[:20]]
    tok = train_tokenizer(corpus(qs) + extra, vocab_size=400, style=style, chat=chat)
    model = build_model(tok, family=family, seed=seed, hidden=32, layers=2, heads=4)
    return save_model(model, tok, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama, byte-level BPE tokenizer with a chat template."""
    return _build(tmp_path_factory, "llama", "bytelevel", True, "llama", seed=0)


@pytest.fixture(scope="session")
def qwen_plain_dir(tmp_path_factory) -> Path:
    """Tiny Qwen2, Metaspace/Unigram tokenizer, no chat template (plain "Answer:" prompts)."""
    return _build(tmp_path_factory, "qwen", "metaspace", False, "qwen2", seed=1)


@pytest.fixture
def mcq_file(tmp_path, questions) -> Path:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, questions)
    return path


def run_script(script: str, *args, env: dict | None = None, timeout: float = 600, cwd: Path = ROOT):
    """Run a stage script of the repo as a user would; returns the CompletedProcess."""
    # PYTHONPATH: the scripts import `atkd` from this checkout even where it is not pip-installed.
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def run():
    return run_script


def send_chat_reply(handler, text: str) -> None:
    """Answer an OpenAI-compatible chat request with `text` (from a test's fake endpoint's do_POST)."""
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
