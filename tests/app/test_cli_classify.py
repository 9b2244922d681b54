"""``slimtune finetune --task classify`` and ``slimtune eval --task classify`` as a user runs them, on the bundled
MiniLM and BBC News topics (and a labelled file of one's own): train, resume, evaluate, merge, export to PEFT and
load the results in the tools they are for; careless inputs give one line, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import slimtune.app.cli as cli
from slimtune.app.labelled_data import bbc_topic_data
from slimtune.app.models import load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--model", "minilm", "--seq-len", "32", "--batch-size", "5", "--eval-examples", "20", "--no-progress"]
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def run_cli(*argv: object) -> int:
    return cli.main([str(arg) for arg in argv])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("slimtune ")]
    assert len(errors) == 1, err
    return errors[0]


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA classifier run on 4 BBC articles per topic, 4 steps (then extended by a resume test)."""
    output = tmp_path_factory.mktemp("classify") / "run"
    options = ["--method", "lora", "--r", "4", "--k-shot", "4", "--steps", "4", "--lr", "5e-3"]
    assert run_cli("finetune", "--task", "classify", *SMALL, *options, "--output", output) == 0
    return output


def headline_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    texts = [text.split("\n", 1)[0] for text in bbc_topic_data("test").texts[:6]]
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_finetune_writes_the_adapter_with_its_head_labels_metrics_and_pictures(trained):
    record = json.loads((trained / "run.json").read_text())
    assert record["task"] == "classify" and record["k_shot"] == 4 and record["labels"] == TOPICS
    held_out = record["held_out"]
    assert held_out["n"] == 20 and 0 <= held_out["accuracy"] <= 1 and len(held_out["confusion"]) == 5
    assert sum(map(sum, held_out["confusion"])) == 20
    saved = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["labels"] == TOPICS
    assert saved["base_model"]["class"] == "BertForSequenceClassification"
    assert (trained / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained / "loss_curves.png").is_file()


def test_eval_merge_export_reproduce_the_trained_classifier(trained, tmp_path, capsys):
    adapter = trained / "adapter"
    capsys.readouterr()
    assert (
        run_cli(
            "eval",
            "--task",
            "classify",
            "--model",
            "minilm",
            "--adapter",
            adapter,
            "--seq-len",
            "32",
            "--max-examples",
            "20",
            "--confusion-plot",
            tmp_path / "cm.png",
        )
        == 0
    )
    from_adapter = last_json(capsys)
    assert from_adapter["labels"] == TOPICS and from_adapter["n"] == 20 and (tmp_path / "cm.png").is_file()
    assert run_cli("merge", "--model", "minilm", "--adapter", adapter, "--output", tmp_path / "merged") == 0
    assert (
        run_cli("eval", "--task", "classify", "--model", tmp_path / "merged", "--seq-len", "32", "--max-examples", "20")
        == 0
    )
    from_merged = last_json(capsys)
    assert from_merged["confusion"] == from_adapter["confusion"]
    assert from_merged["loss"] == pytest.approx(from_adapter["loss"], abs=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label[3] == "sports"
    expected = headline_logits(merged, tokenizer)
    assert run_cli("export", "--model", "minilm", "--adapter", adapter, "--output", tmp_path / "peft") == 0
    base, _ = load_classifier("minilm", TOPICS)
    via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(headline_logits(via_peft, tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_resume_extends_the_run(trained, capsys):
    options = ["--method", "lora", "--r", "4", "--k-shot", "4", "--steps", "6", "--lr", "5e-3"]
    assert run_cli("finetune", "--task", "classify", *SMALL, *options, "--output", trained, "--resume") == 0
    record = json.loads((trained / "run.json").read_text())
    assert record["start_step"] == 4 and len(record["losses"]) == 2


def test_an_output_adapter_on_minilm_goes_after_berts_output_projections(tmp_path):
    options = ["--method", "bottleneck", "--r", "4", "--k-shot", "2", "--steps", "1"]
    assert run_cli("finetune", "--task", "classify", *SMALL, *options, "--output", tmp_path) == 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["target_modules"] == r".*output\.dense"
    assert len(saved["modules"]) == 12  # 6 layers × (attention output, FFN output)
    assert all(name.endswith("output.dense") for name in saved["modules"])


def test_own_labelled_data_trains_and_evaluates(tmp_path, capsys):
    rows = [{"text": f"{word} story number {i}", "label": word} for i in range(6) for word in ("red", "blue")]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(row) for row in rows))
    held_out = tmp_path / "held.csv"
    held_out.write_text("text,label\nred story here,red\nblue story there,blue\n")
    options = ["--method", "lora", "--r", "2", "--steps", "2", "--data", train, "--eval-data", held_out]
    assert run_cli("finetune", "--task", "classify", *SMALL, *options, "--output", tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["labels"] == ["blue", "red"]
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    assert run_cli("eval", "--task", "classify", "--model", "minilm", "--adapter", adapter, "--data", held_out) == 0
    assert last_json(capsys)["n"] == 2
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\ngreen story,green\n")
    assert run_cli("eval", "--task", "classify", "--model", "minilm", "--adapter", adapter, "--data", unknown) == 2
    assert "label 'green' is not allowed: expected one of ['blue', 'red']" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--task", "classify", "--k-shot", "600"], "fewer than k=600"),
        (["finetune", "--k-shot", "4"], "--k-shot and --eval-examples are allowed with --task classify only"),
        (["finetune", "--task", "classify", "--k-shot", "0"], "k_shot=0 is not allowed: expected a positive integer"),
        (["finetune", "--task", "classify", "--quantize", "nf4"], "quantize='nf4' is not allowed with --task classify"),
        (["finetune", "--task", "classify", "--data", "bbc-instruct"], "data='bbc-instruct' is not allowed"),
        (
            ["finetune", "--task", "classify", "--modules-to-save", "clasifier", "--k-shot", "1"],
            "'clasifier' matches no module of BertForSequenceClassification",
        ),
        (
            ["eval", "--task", "classify", "--model", "minilm", "--harness", "bbc_topic"],
            "is not allowed with --harness",
        ),
    ],
)
def test_careless_inputs_are_one_line(argv, message, tmp_path, capsys):
    extra = ["--model", "minilm", "--output", tmp_path] if argv[0] == "finetune" else []
    assert run_cli(*argv, *extra) == 2
    assert message in one_error_line(capsys)


def test_a_classifier_adapter_is_refused_by_the_lm_tasks(trained, tmp_path, capsys):
    assert run_cli("eval", "--adapter", trained / "adapter") == 2
    assert "is a sequence classifier's" in one_error_line(capsys)
    assert (
        run_cli(
            "export",
            "--format",
            "gguf",
            "--model",
            "minilm",
            "--adapter",
            trained / "adapter",
            "--output",
            tmp_path / "m.gguf",
        )
        == 2
    )
    assert "--format gguf writes causal LMs" in one_error_line(capsys)


def test_a_local_decoder_folder_becomes_a_classifier_with_its_score_head(tiny, tmp_path, capsys):
    rows = [{"text": f"{word} {i}", "label": word} for i in range(4) for word in ("cat", "dog", "fish")]
    data = tmp_path / "pets.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    options = ["--model", tiny, "--data", data, "--eval-data", data, "--method", "bone", "--r", "4", "--steps", "2"]
    assert run_cli("finetune", "--task", "classify", *options, "--no-progress", "--output", tmp_path / "run") == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model"]["class"] == "LlamaForSequenceClassification" and saved["modules_to_save"] == ["score"]
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    assert run_cli("eval", "--task", "classify", "--model", tiny, "--adapter", adapter, "--data", data) == 0
    assert last_json(capsys)["labels"] == ["cat", "dog", "fish"]
