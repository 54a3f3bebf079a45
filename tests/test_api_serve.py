"""The HTTP backend against a real `transformers serve` process on loopback, serving a tiny local model.

`transformers serve <local folder>` preloads that folder and pins the server to it: requests must
name the model exactly as the folder path was given. It needs the serving extra
(`pip install 'transformers[serving]'`: fastapi, uvicorn, pydantic, openai); without it the test skips.
"""

from __future__ import annotations

import pytest

from atkd.tree import load_tree
from conftest import served_requests, tail, transformers_serve


@pytest.fixture
def served_model(tmp_path, llama_dir):
    with transformers_serve(llama_dir, tmp_path) as server:
        yield server


@pytest.mark.e2e
def test_create_tree_through_transformers_serve(tmp_path, run, served_model):
    res = run("create_initial_tree.py", "--api_base", served_model["base"], "--api_model", served_model["model"],
              "--domain", "Clinical medicine", "--nodes_per_level", "2,2", "--max_new_tokens", "12",
              "--max_retries", "1", "--output_dir", tmp_path / "trees",
              "--api_key_env", "ATKD_TEST_KEY", env={"ATKD_TEST_KEY": "not-a-secret"}, timeout=300)
    assert res.returncode == 0, f"{res.stderr}\n--- server stderr ---\n{tail(served_model['err'])}"
    tree = load_tree(tmp_path / "trees" / "initial_tree.json")
    assert tree.domain == "Clinical medicine"
    # A level-1 node exists only if the server's replies held at least one usable name.
    assert 1 <= len(tree.root.children) <= 2
    assert all(len(n.children) <= 2 for n in tree.root.children)
    # The server itself logged the requests: level 1 (at least one) plus one per level-1 node.
    assert served_requests(served_model) >= 1 + len(tree.root.children), tail(served_model["err"])
