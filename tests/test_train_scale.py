"""train.py for real students: fp32 master weights under bf16, LoRA (merged final_model, resume), FSDP2 sharding.

Every run is the real train.py under `accelerate launch` on the tiny Llama of conftest.py, with
the data and teacher logits of test_train.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
import test_train
from test_train import finish, max_diff, train_args, weights

from atkd.head import HeadAtPositions
from atkd.logits_store import LogitsStore
from atkd.models import load_model, load_tokenizer
from atkd.records import load_questions
from atkd.train_data import build_examples, collate, token_counts
from atkd.trainer import TrainConfig, micro_batch_loss
from atkd.plan import free_port

data_file, store_dir = test_train.data_file, test_train.store_dir  # test_train.py's data and teacher logits
CONFIGS = ROOT / "configs" / "accelerate"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def launch(args, *, config=None, shim=True, launcher=False, **popen):
    """train.py as main.py starts it: one plain CPU process, or two gloo processes under `config` through
    `accelerate launch` (an accelerate config file: FSDP2 or DeepSpeed, run on the CPU through
    tests/sharded_on_cpu.py); `launcher`: one CPU process under `accelerate launch --cpu` too."""
    if not config and not launcher:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                                env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if config:
        cmd += ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no"]
        cmd += [str(ROOT / "tests" / "sharded_on_cpu.py")] if shim else []
    else:
        cmd += ["--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    cmd += [str(ROOT / "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def kill_after_first_checkpoint(args, out, **kw):
    """Start a run saving every step, SIGKILL it (launcher and workers) once checkpoint-1 is complete."""
    proc = launch(args, start_new_session=True, **kw)
    deadline = time.time() + 300
    while not (out / "checkpoint-1" / "trainer_state.json").is_file() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.002)
    # torch.distributed.run starts its workers in sessions of their own: kill the whole tree, as a crash would.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0]
    assert (out / "checkpoint-1").is_dir(), log[-3000:]
    assert not (out / "final_model").exists(), "the run finished before it could be killed"


# --------------------------------------------------------------------------- precision

def changed_share(before: dict, after: dict, min_abs: float) -> float:
    """Share of the decoder layers' weight entries with |w| >= min_abs that training moved (every one of
    them gets a gradient; embedding rows of unused tokens do not)."""
    moved = total = 0
    for k, w in before.items():
        if ".layers." not in f".{k}":
            continue
        big = w.float().abs() >= min_abs
        moved += int(((after[k].float() != w.float()) & big).sum())
        total += int(big.sum())
    return moved / total


def test_bf16_weights_lose_small_updates_fp32_master_weights_keep_them(tmp_path, llama_dir, data_file, store_dir):
    """At lr 5e-6, AdamW's first steps move each weight by about lr; a bf16 weight of |w| >= 2^-8 has a
    spacing of >= 2^-15 = 3.1e-5, so the update rounds away. train.py --dtype bf16 keeps fp32 masters."""
    tok = load_tokenizer(llama_dir)
    examples, _ = build_examples(load_questions(data_file), LogitsStore.open(store_dir), tok, "en", 512, "d")
    batch = collate(examples[:4], [1.0] * 4, tok.pad_token_id)
    cfg = TrainConfig(student_model_path=str(llama_dir), train_file_path=str(data_file),
                      teacher_logits_dir=str(store_dir), output_dir=str(tmp_path / "unused"))

    # What train.py did before with --dtype bf16: bf16 weights, plain AdamW.
    model = load_model(llama_dir, dtype="bf16")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=5e-6, weight_decay=0.0)
    for _ in range(3):
        loss, _, _ = micro_batch_loss(HeadAtPositions(model, len(tok)), batch, *token_counts(batch), cfg)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert changed_share(before, model.state_dict(), 2 ** -8) == 0.0  # three steps, not one weight moved

    # train.py --dtype bf16 now: bf16 autocast, fp32 master weights (a plain process: it decides the precision).
    out = tmp_path / "bf16"
    args = train_args(llama_dir, data_file, store_dir, out, "--dtype", "bf16", "--learning_rate", "5e-6",
                      "--warmup_ratio", "0", "--lr_scheduler", "constant")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stderr
    final = weights(out / "final_model")
    assert all(v.dtype == torch.float32 for v in final.values())  # the masters are what is saved
    student = weights(llama_dir)
    assert changed_share(student, final, 2 ** -8) > 0.95


def test_dtype_that_contradicts_the_launch_is_refused(tmp_path, llama_dir, data_file, store_dir):
    out = tmp_path / "out"
    log = launch(train_args(llama_dir, data_file, store_dir, out, "--dtype", "bf16"),
                 launcher=True).communicate(timeout=300)[0]
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--dtype bf16" in errors[0] and "'no'" in errors[0], log[-2000:]
    assert not (out / "final_model").exists()


# --------------------------------------------------------------------------- LoRA

LORA = ("--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1")  # dropout: resume must restore the RNG


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir, data_file, store_dir):
    out = tmp_path_factory.mktemp("lora") / "student"
    finish(launch(train_args(llama_dir, data_file, store_dir, out, *LORA)))
    return out


def test_lora_final_model_is_merged_and_loads_without_peft(tmp_path, lora_run, llama_dir):
    final, adapter = lora_run / "final_model", lora_run / "final_adapter"
    assert sorted(p.name for p in lora_run.iterdir()) == ["checkpoint-2", "checkpoint-4", "final_adapter",
                                                         "final_model", "train.done.json"]
    merged, student = weights(final), weights(llama_dir)
    assert merged.keys() == student.keys()  # a plain model: no adapter weights, no peft names
    assert max_diff(merged, student) > 1e-4  # it trained ...
    for k in merged:  # ... only where adapters were: norms and embeddings are the student's
        if not k.endswith("proj.weight"):
            assert torch.equal(merged[k], student[k]), k

    # merged = W + alpha / r * B @ A, with the adapter saved beside it
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in ad.items() if name in k and "lora_A" in k)
    b = next(v for k, v in ad.items() if name in k and "lora_B" in k)
    expected = student[f"{name}.weight"] + (8 / 4) * b @ a
    assert torch.allclose(merged[f"{name}.weight"], expected, atol=1e-6)

    # plain transformers and inference.py load it with peft made unimportable
    blocker = tmp_path / "no_peft" / "peft"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('peft is blocked in this test')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT)]))
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}, use_safetensors=True); "
             "assert 'peft' not in sys.modules or sys.modules['peft'] is None; print('loaded', m.num_parameters())")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    replies = tmp_path / "replies.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", str(final), "--dataset_path",
                           str(ROOT / "data" / "demo" / "eval.jsonl"), "--output_path", str(replies)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(replies.read_text().splitlines()) == 240


def test_lora_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, lora_run, llama_dir, data_file, store_dir):
    out = tmp_path / "killed"
    args = train_args(llama_dir, data_file, store_dir, out, *LORA, "--save_steps", "1")
    kill_after_first_checkpoint(args, out)
    saved = load_file(str(out / "checkpoint-1" / "adapter.safetensors"))  # the adapters, not the whole model
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert not (out / "checkpoint-1" / "model.safetensors").exists()
    log = finish(launch(args))
    assert "resumed from" in log
    assert max_diff(weights(out / "final_model"), weights(lora_run / "final_model")) < 1e-6
    assert max_diff(load_file(str(out / "final_adapter" / "adapter_model.safetensors")),
                    load_file(str(lora_run / "final_adapter" / "adapter_model.safetensors"))) < 1e-6


def test_lora_target_that_is_not_in_the_model_exits_2(tmp_path, llama_dir, data_file, store_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *train_args(llama_dir, data_file, store_dir, out, "--lora_r", "4",
                                       "--lora_target_modules", "no_such_proj")],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--lora_target_modules" in errors[0], proc.stderr[-2000:]
    assert not out.exists()


# --------------------------------------------------------------------------- FSDP2

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, llama_dir, data_file, store_dir):
    """Two gloo processes under configs/accelerate/fsdp2.yaml, batch 1 each: the global batch of test_train's runs."""
    out = tmp_path_factory.mktemp("fsdp") / "student"
    args = train_args(llama_dir, data_file, store_dir, out)
    args[args.index("--batch_size") + 1] = "1"
    return out, args, finish(launch(args, config=CONFIGS / "fsdp2.yaml"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, llama_dir, data_file, store_dir):
    out = tmp_path_factory.mktemp("single") / "student"
    finish(launch(train_args(llama_dir, data_file, store_dir, out)))
    return out


@pytest.mark.distributed
def test_fsdp2_shards_checkpoints_and_gathers_a_plain_final_model(fsdp_run, single_run):
    out, _, log = fsdp_run
    assert "training (fsdp2" in log
    ckpt = out / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["backend"] == "fsdp2" and state["sharded"] and state["world_size"] == 2
    # each process wrote its own shard of the model and of AdamW's state (torch.distributed.checkpoint)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "random_states_1.pkl").is_file() and (ckpt / "scheduler.json").is_file()
    final = out / "final_model"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert weights(final).keys() == weights(single_run / "final_model").keys()
    # the same arithmetic as one process with the whole batch, up to the order of the sharded sums
    assert max_diff(weights(final), weights(single_run / "final_model")) < 1e-5


@pytest.mark.distributed
def test_fsdp2_resume_after_sigkill_equals_an_uninterrupted_fsdp2_run(tmp_path, fsdp_run):
    out_ref, args_ref, _ = fsdp_run
    out = tmp_path / "killed"
    args = [str(out) if a == str(out_ref) else a for a in args_ref] + ["--save_steps", "1", "--save_total_limit", "0"]
    kill_after_first_checkpoint(args, out, config=CONFIGS / "fsdp2.yaml")
    log = finish(launch(args, config=CONFIGS / "fsdp2.yaml"))
    assert "resumed from" in log
    assert max_diff(weights(out / "final_model"), weights(out_ref / "final_model")) < 1e-6
    assert not list(out.glob(".tmp-*"))


def test_fsdp_config_that_accelerate_would_run_unsharded_is_refused(tmp_path, llama_dir, data_file, store_dir):
    """Without GPUs accelerate turns an FSDP launch into plain gloo data parallelism: train.py says so and stops."""
    out = tmp_path / "out"
    log = launch(train_args(llama_dir, data_file, store_dir, out), config=CONFIGS / "fsdp2.yaml",
                 shim=False).communicate(timeout=300)[0]
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert errors and "asks for FSDP" in errors[0] and "MULTI_CPU" in errors[0], log[-2000:]
    assert not (out / "final_model").exists()


# --------------------------------------------------------------------------- DeepSpeed ZeRO (when installed)

@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, llama_dir, data_file, store_dir):
    """configs/accelerate/zero3.yaml on two gloo processes (DeepSpeed's CPU accelerator), batch 1 each."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    out = tmp_path_factory.mktemp("zero3") / "student"
    args = train_args(llama_dir, data_file, store_dir, out)
    args[args.index("--batch_size") + 1] = "1"
    return out, args, finish(launch(args, config=CONFIGS / "zero3.yaml"))


@pytest.mark.distributed
def test_zero3_partitions_checkpoints_and_gathers_a_plain_final_model(zero3_run, single_run):
    out, _, log = zero3_run
    assert "training (deepspeed-zero3" in log
    ckpt = out / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["backend"] == "deepspeed-zero3" and state["sharded"] and state["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert max_diff(weights(out / "final_model"), weights(single_run / "final_model")) < 1e-5


@pytest.mark.distributed
def test_zero3_resume_after_sigkill_equals_an_uninterrupted_zero3_run(tmp_path, zero3_run):
    out_ref, args_ref, _ = zero3_run
    out = tmp_path / "killed"
    args = [str(out) if a == str(out_ref) else a for a in args_ref] + ["--save_steps", "1", "--save_total_limit", "0"]
    kill_after_first_checkpoint(args, out, config=CONFIGS / "zero3.yaml")
    log = finish(launch(args, config=CONFIGS / "zero3.yaml"))
    assert "resumed from" in log
    assert max_diff(weights(out / "final_model"), weights(out_ref / "final_model")) < 1e-6


@pytest.mark.distributed
def test_zero2_with_accumulation_equals_one_process(tmp_path, single_run, llama_dir, data_file, store_dir):
    """ZeRO-2, and a DeepSpeed config whose own accumulation steps (1, as `accelerate config` writes) train.py overrides."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    config = tmp_path / "zero2.yaml"
    config.write_text((CONFIGS / "zero3.yaml").read_text().replace("zero_stage: 3", "zero_stage: 2")
                      .replace("deepspeed_config:\n", "deepspeed_config:\n  gradient_accumulation_steps: 1\n"))
    out = tmp_path / "zero2"
    args = train_args(llama_dir, data_file, store_dir, out)
    args[args.index("--batch_size") + 1] = "1"
    log = finish(launch(args, config=config))
    assert "training (deepspeed-zero2" in log and "gradient_accumulation_steps 1 -> 2" in log
    assert max_diff(weights(out / "final_model"), weights(single_run / "final_model")) < 1e-5


@pytest.fixture(scope="module")
def lora_single(tmp_path_factory, llama_dir, data_file, store_dir):
    out = tmp_path_factory.mktemp("lora_single") / "student"
    finish(launch(train_args(llama_dir, data_file, store_dir, out, "--lora_r", "4", "--lora_alpha", "8",
                             "--lora_dropout", "0")))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero3.yaml"])
def test_lora_sharded_equals_lora_in_one_process(tmp_path, config, lora_single, llama_dir, data_file, store_dir):
    """LoRA through FSDP2 / ZeRO-3: adapters trained on shards, gathered, merged on the main process."""
    if config.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    out = tmp_path / "student"
    args = train_args(llama_dir, data_file, store_dir, out, "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")
    args[args.index("--batch_size") + 1] = "1"
    finish(launch(args, config=CONFIGS / config))
    assert max_diff(weights(out / "final_model"), weights(lora_single / "final_model")) < 1e-6
    assert max_diff(load_file(str(out / "final_adapter" / "adapter_model.safetensors")),
                    load_file(str(lora_single / "final_adapter" / "adapter_model.safetensors"))) < 1e-6
