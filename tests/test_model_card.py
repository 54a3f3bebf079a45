"""Model cards: train.py's at the end of training, main.py's after the evaluation; the YAML header read back as
YAML; writing a card changes no model folder's content hash (later stages do not rerun)."""

import json
import shutil

import pytest
import yaml
from conftest import make_questions

import main
import train
from atkd import model_card
from atkd.cli import parse_config
from atkd.fingerprint import signature
from atkd.io import write_json, write_jsonl
from atkd.teacher_logits import LogitsConfig
from atkd.teacher_logits import run as run_teacher_logits
from atkd.workflow import WorkflowConfig


def header(card_path) -> dict:
    text = card_path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("carded")
    data = root / "validated.jsonl"
    write_jsonl(data, make_questions(8, seed=11))
    logits = root / "E_teacher_logits"
    run_teacher_logits(LogitsConfig(model_path=str(llama_dir), dataset_path=str(data), output_dir=str(logits),
                                    batch_size=8))
    out = root / "iteration_1_student_model"
    assert train.main(["--student_model_path", str(llama_dir), "--train_file_path", str(data), "--teacher_logits_dir",
                       str(logits), "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "4",
                       "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--alpha_ce", "0.3"]) == 0
    return out


def test_train_py_writes_a_card_with_a_yaml_header(trained, llama_dir):
    card = trained / "final_model" / "README.md"
    meta = header(card)
    assert meta["base_model"] == str(llama_dir) and meta["library_name"] == "transformers"
    assert {"distillation", "at-kd"} <= set(meta["tags"]) and meta["datasets"] == ["validated.jsonl"]
    text = card.read_text(encoding="utf-8")
    assert f"from the teacher `{llama_dir}`" in text  # from the logits' index
    assert "| alpha_ce | 0.3 |" in text and "| kd_loss | forward_kl |" in text
    assert "| 8 | 2 |" in text  # 8 training items, 2 optimizer steps
    assert "No evaluation yet" in text


def workflow_cfg(tmp_path, student) -> WorkflowConfig:
    return parse_config(WorkflowConfig, ["--student_model_path", str(student), "--workflow_output_dir",
                                         str(tmp_path / "wf"), "--models_output_dir", str(tmp_path / "models")],
                        defaults=main.defaults())


def report_with_eval() -> dict:
    def accs(overall, leaf):
        ci = [max(0.0, overall - 0.05), min(1.0, overall + 0.05)]
        return {"overall": {"n": 240, "correct": round(240 * overall), "accuracy": overall, "ci95": ci},
                "Pharmacology > Anticoagulants": {"n": 20, "correct": round(20 * leaf), "accuracy": leaf}}

    return {"baseline_eval": accs(0.6875, 0.05), "teacher_eval": accs(1.0, 1.0),
            "iterations": [{"iteration": 1, "generated": 480, "validated": 390, "replay": {"replay": 130},
                            "eval_before": accs(0.6875, 0.05), "eval_after": accs(0.842, 0.6)},
                           {"iteration": 2, "generated": 470, "validated": 380, "replay": {"replay": 127},
                            "eval_before": accs(0.842, 0.6), "eval_after": accs(0.958, 0.8)}]}


def test_main_py_rewrites_the_card_with_every_iteration_and_the_per_ability_table(tmp_path, trained, llama_dir):
    cfg = workflow_cfg(tmp_path, llama_dir)
    models = tmp_path / "models"
    for i in (1, 2):
        shutil.copytree(trained / "final_model", models / f"iteration_{i}_student_model" / "final_model")
    first = models / "iteration_1_student_model" / "final_model"
    before = signature(first)
    report = report_with_eval()
    for i in (1, 2):
        model_card.write_iteration_cards(cfg, report, i, models)
    assert signature(first) == before  # the card is not content: iteration 2's student is unchanged
    card = models / "iteration_2_student_model" / "final_model" / "README.md"
    meta = header(card)
    assert meta["base_model"] == str(first)  # iteration 2 started from iteration 1's model
    assert meta["datasets"] == ["iteration_1.jsonl", "iteration_2.jsonl"]
    assert {"distillation", "at-kd"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    text = card.read_text(encoding="utf-8")
    assert f"from the teacher `{cfg.teacher_model_path}`" in text
    assert f"| 1 | `{llama_dir}` | `data/demo/iteration_1.jsonl` | 480 | 390 | 130 | 8 | 2 |" in text
    assert f"| 2 | `{first}` | `data/demo/iteration_2.jsonl` | 470 | 380 | 127 | 8 | 2 |" in text
    assert "| overall | 240 | 100.0% (95-100) | 84.2% (79-89) | 95.8% (91-100) | +11.6 |" in text
    assert "| Pharmacology > Anticoagulants | 20 | 100.0% | 60.0% | 80.0% | +20.0 |" in text
    assert header(first / "README.md")["base_model"] == str(llama_dir)


def test_base_model_is_the_hub_id_the_config_names(tmp_path):
    folder = tmp_path / "student"
    write_json(folder / "config.json", {"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "model_type": "qwen2"})
    assert model_card.base_model_name(folder) == "Qwen/Qwen2.5-0.5B-Instruct"
    write_json(folder / "config.json", {"_name_or_path": "/models/local", "model_type": "qwen2"})
    assert model_card.base_model_name(folder) == str(folder)


def test_a_card_changes_no_signature_but_weights_do(tmp_path, trained):
    folder = tmp_path / "m"
    shutil.copytree(trained / "final_model", folder)
    (folder / "README.md").unlink()
    bare = signature(folder)
    (folder / "README.md").write_text("---\nbase_model: x\n---\n", encoding="utf-8")
    assert signature(folder) == bare
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True}), encoding="utf-8")
    assert signature(folder) != bare
