"""Placing a local model on several GPUs (atkd/models.py): a whole copy per GPU when it fits one GPU,
one copy spread over all of them (device_map="auto", max_memory naming only those GPUs) when it does not.

This machine has no GPU: the decision is tested with the real weight sizes of tiny model folders and
fake free-memory figures; loading through `device_map` is tested on the CPU. Loading and running a
model actually spread over several GPUs is not tested here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from atkd import models
from atkd.errors import InputError
from atkd.models import (ACTIVATION_MARGIN, choose_placement, load_model, placement_plan, spread_max_memory,
                         weights_bytes)
from atkd.tiny import build_model, save_model, train_tokenizer

GIB = 1024 ** 3


def test_auto_spreads_only_what_does_not_fit_the_emptiest_gpu():
    free = {0: 80 * GIB, 1: 40 * GIB}
    assert choose_placement("auto", 30 * GIB, free) == "per_gpu"  # 37.5 GiB with the margin: fits both
    assert choose_placement("auto", 33 * GIB, free) == "spread"  # 41.25 GiB: not GPU 1
    assert choose_placement("auto", 145 * GIB, {0: 80 * GIB, 1: 80 * GIB, 2: 80 * GIB, 3: 80 * GIB}) == "spread"
    assert choose_placement("auto", 500 * GIB, {0: 80 * GIB}) == "per_gpu"  # one GPU: nothing to spread over
    assert choose_placement("auto", 500 * GIB, {}) == "per_gpu"  # the CPU
    assert choose_placement("spread", 1 * GIB, free) == "spread"  # forced either way
    assert choose_placement("per_gpu", 500 * GIB, free) == "per_gpu"


def test_spread_memory_names_only_the_listed_gpus_less_the_margin():
    limits = spread_max_memory({2: 80 * GIB, 5: 60 * GIB})
    assert list(limits) == [2, 5]  # no "cpu" or "disk": nothing is offloaded
    assert limits[2] == int(80 * GIB / ACTIVATION_MARGIN) and limits[5] == int(60 * GIB / ACTIVATION_MARGIN)


def test_plan_from_the_folders_weights(llama_dir, monkeypatch, caplog):
    size = weights_bytes(llama_dir)
    assert size == sum(f.stat().st_size for f in llama_dir.glob("*.safetensors")) > 0

    def free_as(per_gpu: float):
        monkeypatch.setattr(models, "free_gpu_bytes", lambda ids: {g: int(per_gpu * size) for g in ids})

    free_as(2.0)  # 2x the weights free on each GPU: a copy per GPU, one worker each
    assert placement_plan(llama_dir, [0, 1, 2, 3]) == ([0, 1, 2, 3], [])
    free_as(1.1)  # the weights fit, but not with room for activations: one copy over all four
    assert placement_plan(llama_dir, [0, 1, 2, 3]) == ([], [0, 1, 2, 3])
    assert placement_plan(llama_dir, [0, 1, 2, 3], "per_gpu") == ([0, 1, 2, 3], [])
    assert "may not fit one GPU" in caplog.text  # forced per_gpu on too small GPUs is warned about
    free_as(2.0)
    assert placement_plan(llama_dir, [0, 1], "spread") == ([], [0, 1])
    assert placement_plan(llama_dir, [3]) == ([3], []) and placement_plan(llama_dir, []) == ([], [])
    free_as(0.2)  # 4 x 0.2 / 1.25 of the weights: does not fit even spread
    with pytest.raises(InputError, match=r"do not fit GPUs \[0, 1, 2, 3\] even spread over all of them"):
        placement_plan(llama_dir, [0, 1, 2, 3])


def test_sharded_weights_count_the_shards_the_index_lists(tmp_path):
    texts = ["Question: which is a drug?\nA. aspirin\nB. femur\nAnswer: A"] * 20
    tok = train_tokenizer(texts, vocab_size=300, style="bytelevel", chat=False)
    model = build_model(tok, family="llama", seed=0, hidden=64, layers=4, heads=4)
    folder = save_model(model, tok, tmp_path / "sharded")
    model.save_pretrained(str(folder), max_shard_size="100KB")  # several shards and an index
    (folder / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    torch.save({}, folder / "stray.bin")  # not weights of this checkpoint: not counted
    assert weights_bytes(folder) == sum(f.stat().st_size for f in shards)


def test_device_map_loading_gives_the_same_model(llama_dir):
    """The kwargs the spread path passes (device_map="auto" with max_memory) load the same weights; on
    this machine the only device is the CPU."""
    plain = load_model(llama_dir)
    mapped = load_model(llama_dir, device_map="auto", max_memory={"cpu": 2 * GIB})
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)


@pytest.fixture(autouse=True)
def info_logs():
    logging.getLogger("atkd.models").setLevel(logging.INFO)
    yield
