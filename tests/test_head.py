"""The output head at chosen positions (atkd.head): every family's scaling reproduced, a head that
disagrees with the model refused at load, in-process and through the stage scripts."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import make_questions

from atkd.batching import left_pad
from atkd.errors import InputError
from atkd.head import HeadAtPositions, verify_head
from atkd.io import write_jsonl
from atkd.tiny import HEAD_FAMILIES, head_family_model


def tiny_family_model(name: str):
    try:
        return head_family_model(name)
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no {name!r}")


@pytest.mark.parametrize("name", list(HEAD_FAMILIES))
def test_head_at_positions_equals_the_models_own_logits(name):
    """A left-padded batch, scattered positions, a vocabulary smaller than the head: model(...).logits to 1e-5."""
    model = tiny_family_model(name)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (11, 7)]
    inputs = left_pad(seqs, pad_id=0)
    n_vocab = 90  # rows past the tokenizer's vocabulary are padding, never part of the distribution
    rows, cols = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 5, 10, 4, 10])
    with torch.no_grad():
        got = HeadAtPositions(model, n_vocab)(**inputs, rows=rows, cols=cols)
        want = model(**inputs, use_cache=False).logits[rows, cols, :n_vocab]
    assert got.shape == (5, n_vocab)
    assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("name", list(HEAD_FAMILIES))
def test_every_family_in_bf16_passes_the_load_check(name):
    """bf16 is how GPUs run them: the head's operations are the model's own, so the probe agrees to rounding."""
    model = tiny_family_model(name).to(torch.bfloat16)
    head = HeadAtPositions(model, 90, verify=False)
    assert verify_head(head) <= 4 * torch.finfo(torch.bfloat16).eps * 10  # logits here are below 10


@pytest.mark.parametrize("name", ["cohere", "gemma2", "granite", "falcon_h1", "minicpm3"])
def test_float32_letter_rows_follow_the_family_scaling(name):
    model = tiny_family_model(name)
    head = HeadAtPositions(model, 90)
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([5, 17, 60])
    with torch.no_grad():
        assert torch.allclose(head.token_logits_fp32(hidden, ids), head.logits(hidden)[:, ids], atol=1e-5, rtol=0)


# A Llama whose forward adds 0.5 to every logit: a family step the project's head does not know.
# Also written into a model folder as remote code (config.json auto_map) for the stage scripts.
OFFSET_MODELING = '''
from transformers import LlamaForCausalLM


class OffsetLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + 0.5
        return out
'''


def offset_llama(folder):
    scope: dict = {}
    exec(OFFSET_MODELING, scope)
    return scope["OffsetLlamaForCausalLM"].from_pretrained(str(folder))


def test_a_head_that_disagrees_with_the_model_is_refused_at_load(llama_dir):
    model = offset_llama(llama_dir)
    with pytest.raises(InputError) as err:
        HeadAtPositions(model, model.config.vocab_size)
    msg = err.value.message()
    assert msg.startswith(f"{llama_dir}: ") and "output head" in msg and "not reproduced" in msg
    assert "up to 0.5" in msg


def test_verification_runs_without_dropout_and_keeps_the_training_mode(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), attention_dropout=0.5).train()
    HeadAtPositions(model, model.config.vocab_size)  # two dropout draws would differ: the check runs in eval mode
    assert model.training


@pytest.fixture(scope="module")
def offset_dir(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offset") / "offset_model"
    shutil.copytree(llama_dir, folder)
    (folder / "modeling_offset.py").write_text(OFFSET_MODELING, encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_offset.OffsetLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("script,args", [
    ("generate_logits.py", ["--model_path", "{model}", "--dataset_path", "{data}", "--output_dir", "{out}/E"]),
    ("inference.py", ["--model_path", "{model}", "--dataset_path", "{data}", "--output_path", "{out}/A/r.jsonl"]),
])
def test_stages_refuse_a_model_whose_head_is_not_reproduced(offset_dir, tmp_path, run, script, args):
    data = tmp_path / "q.jsonl"
    write_jsonl(data, make_questions(4, seed=2))
    argv = [a.format(model=offset_dir, data=data, out=tmp_path) for a in args] + ["--trust_remote_code"]
    res = run(script, *argv, env={"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {offset_dir}: ") and "not reproduced" in errors[0]
    assert "Traceback" not in res.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != data and "hf_modules" not in p.parts]
    assert written == []  # no output, no partial work


def test_training_refuses_a_student_whose_head_is_not_reproduced(offset_dir, llama_dir, tmp_path, run):
    from atkd.teacher_logits import LogitsConfig
    from atkd.teacher_logits import run as run_teacher_logits

    data = tmp_path / "q.jsonl"
    write_jsonl(data, make_questions(4, seed=2))
    store, out = tmp_path / "E", tmp_path / "F"
    run_teacher_logits(LogitsConfig(model_path=str(llama_dir), dataset_path=str(data), output_dir=str(store)))
    res = run("train.py", "--student_model_path", offset_dir, "--train_file_path", data, "--teacher_logits_dir", store,
              "--output_dir", out, "--trust_remote_code",
              env={"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {offset_dir}: ") and "not reproduced" in errors[0]
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing trained, nothing saved
