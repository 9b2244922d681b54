"""The ``slimtune`` command line on a tiny Llama saved as a local HF folder with a character-level tokenizer.

Every command runs end to end on it; every field of every method's config (and of the training and
linear-attention configs) is an option; ``--help`` of every command works; mistakes end with a clear message.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimtune as st
import slimtune.app.cli as cli
import slimtune.app.commands as commands
import slimtune.app.options as options
from cases import tiny_llama
from slimtune.linear_attention import LinearizeConfig
from slimtune.training import TrainConfig

COMMANDS = ["finetune", "compare", "linearize", "eval", "merge", "export", "import", "models", "bench"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """(training, held-out) text files: documents separated by blank lines."""
    folder = tmp_path_factory.mktemp("texts")
    paths = folder / "train.txt", folder / "eval.txt"
    for path, offset in zip(paths, (0, 100)):
        path.write_text(
            "\n\n".join(f"the cat {i} sat on the mat {i + 1} and the dog ran" for i in range(offset, offset + 30))
        )
    return paths


def run_cli(*argv: str) -> int:
    return cli.main([str(arg) for arg in argv])


def eval_report(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    """Run ``slimtune eval`` on 16 blocks of 32 tokens; its JSON report."""
    capsys.readouterr()
    assert run_cli("eval", *argv, "--seq-len", "32", "--max-blocks", "16") == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def data_options(tiny: Path, texts: tuple[Path, Path]) -> list[str]:
    return ["--model", str(tiny), "--data", str(texts[0]), "--eval-data", str(texts[1]), "--seq-len", "32"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(*([command] if command else []), "--help")
    assert done.value.code == 0
    assert f"usage: slimtune {command or ''}".strip() in capsys.readouterr().out


def test_every_config_field_is_an_option(capsys):
    helps = {}
    for command in ("finetune", "linearize"):
        with pytest.raises(SystemExit):
            run_cli(command, "--help")
        helps[command] = capsys.readouterr().out
    renamed = {"seed": "adapter-seed"}
    for config in st.METHODS.values():
        for field in dataclasses.fields(config):
            flag = renamed.get(field.name, field.name.replace("_", "-"))
            assert f"--{flag} " in helps["finetune"] and f"--{flag} " in helps["linearize"], (config.method, flag)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("output_dir", "desc"):
            assert f"--{field.name.replace('_', '-')} " in helps["finetune"], field.name
    for field in dataclasses.fields(LinearizeConfig):
        flag = "linear-seed" if field.name == "seed" else field.name.replace("_", "-")
        assert f"--{flag} " in helps["linearize"], field.name


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [
                "--method",
                "lora",
                "--r",
                "4",
                "--alpha",
                "8",
                "--use-rslora",
                "--init",
                "gaussian",
                "--target-modules",
                "q_proj",
                "v_proj",
            ],
            st.LoraConfig(r=4, alpha=8.0, use_rslora=True, init="gaussian", target_modules=["q_proj", "v_proj"]),
        ),
        (["--method", "bat_row", "--r", "6"], st.DishaConfig(r=6, variant="bat_row")),
        (
            ["--method", "disha", "--variant", "mini", "--mini-r", "3", "--dropout", "0.1"],
            st.DishaConfig(variant="mini", mini_r=3, dropout=0.1),
        ),
        (
            ["--method", "lora_sp", "--freeze-fraction", "0.25", "--granularity", "rank", "--adapter-seed", "3"],
            st.LoraSpConfig(freeze_fraction=0.25, granularity="rank", seed=3),
        ),
        (
            [
                "--method",
                "surm",
                "--structure",
                "ldr",
                "--block-size",
                "6",
                "--displacement-rank",
                "2",
                "--alpha",
                "0.5",
            ],
            st.SurmConfig(structure="ldr", block_size=6, displacement_rank=2, alpha=0.5),
        ),
        (
            ["--method", "surm_adapter", "--activation", "gelu", "--no-bias", "--target-modules", r".*\.o_proj"],
            st.SurmAdapterConfig(activation="gelu", bias=False, target_modules=r".*\.o_proj"),
        ),
        (
            ["--method", "bottleneck", "--r", "8", "--activation", "relu", "--scaling", "0.5", "--no-bias"],
            st.BottleneckConfig(r=8, activation="relu", scaling=0.5, bias=False),
        ),
        ([], st.DishaConfig(variant="bone")),
    ],
)
def test_method_options_build_each_config(argv, expected):
    args = cli.build_parser().parse_args(["finetune", *argv])
    assert options.adapter_config(args.method, options.collect(args, args.adapter_options, skip_none=True)) == expected


def test_options_a_method_lacks_are_refused(tiny, capsys):
    assert run_cli("finetune", "--model", tiny, "--method", "lora", "--structure", "toeplitz") == 2
    assert "structure='toeplitz' is not an option of method 'lora'; its options are" in capsys.readouterr().err
    with pytest.raises(st.ConfigError, match="use method 'disha' with variant='bat_row'"):
        options.adapter_config("bone", {"variant": "bat_row"})
    with pytest.raises(SystemExit):
        run_cli("finetune", "--no-such-option")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--r", "abc"], "argument --r: 'abc' is not allowed: expected an int"),
        (["--lr", "fast"], "argument --lr: 'fast' is not allowed: expected a float"),
        (["--block-size", "x"], "argument --block-size: 'x' is not allowed: expected an int or None"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_flag_and_the_type(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("finetune", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_run_specs():
    label, config, lr = options.parse_run("wide=lora:r=6,alpha=12,lr=1e-3,target_modules=q_proj+v_proj,use_rslora=true")
    assert (label, lr) == ("wide", 1e-3)
    assert config == st.LoraConfig(r=6, alpha=12.0, use_rslora=True, target_modules=["q_proj", "v_proj"])
    assert options.parse_run("bat_row:r=16") == ("bat_row", st.DishaConfig(r=16, variant="bat_row"), None)
    with pytest.raises(st.ConfigError, match="r='x' is not allowed: expected a int"):
        options.parse_run("lora:r=x")
    with pytest.raises(st.ConfigError, match="not an option of method 'surm'"):
        options.parse_run("surm:variant=bone")


def test_finetune_resume_eval_merge_export(tiny, texts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train = [
        *data_options(tiny, texts),
        "--method",
        "lora",
        "--r",
        "4",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--output",
        out,
        "--no-progress",
    ]
    assert run_cli("finetune", *train, "--steps", "4") == 0
    assert run_cli("finetune", *train, "--steps", "6", "--resume") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["start_step"] == 4 and len(record["losses"]) == 2 and set(record["eval_losses"]) == {"6"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    capsys.readouterr()

    report = eval_report(capsys, "--model", tiny, "--adapter", out / "adapter", "--data", texts[1])
    assert report["loss"] == pytest.approx(record["eval_losses"]["6"], rel=1e-4)

    assert run_cli("merge", "--model", tiny, "--adapter", out / "adapter", "--output", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = st.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), out / "adapter")
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())

    assert (
        run_cli(
            "export", "--format", "peft", "--model", tiny, "--adapter", out / "adapter", "--output", tmp_path / "peft"
        )
        == 0
    )
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_export_of_a_method_without_peft_equivalent_fails_clearly(tiny, tmp_path, capsys):
    st.save_adapter(st.get_adapted_model(tiny_llama(), st.DishaConfig(r=6, variant="bat_row")), tmp_path / "bat")
    assert run_cli("export", "--model", tiny, "--adapter", tmp_path / "bat", "--output", tmp_path / "peft") == 2
    assert "variant='bat_row' has no PEFT equivalent" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()


def test_compare_writes_table_plot_and_record(tiny, texts, tmp_path, capsys):
    out = tmp_path / "compare"
    runs = [
        "--run",
        "lora:r=4,lr=1e-2",
        "--run",
        "bone:r=6",
        "--run",
        "circ=surm:structure=circulant,block_size=6,lr=1e-2",
    ]
    assert (
        run_cli(
            "compare",
            *data_options(tiny, texts),
            "--steps",
            "3",
            "--eval-every",
            "2",
            *runs,
            "--output",
            out,
            "--no-progress",
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| lora |" in table and "| bone |" in table and "| circ |" in table and "step s (median)" in table
    record = json.loads((out / "compare.json").read_text())
    assert [row["label"] for row in record["rows"]] == ["lora", "bone", "circ"]
    for row in record["rows"]:
        assert len(row["losses"]) == 3 and set(row["eval_losses"]) == {"2", "3"} and row["peak_bytes"] > 0
        assert row["trainable"] > 0 and (out / row["label"] / "adapter" / "adapter_config.json").is_file()
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linearize_then_evaluate(tiny, texts, tmp_path, capsys):
    out = tmp_path / "linear"
    assert (
        run_cli(
            "linearize",
            *data_options(tiny, texts),
            "--transfer-steps",
            "2",
            "--finetune-steps",
            "2",
            "--method",
            "lora",
            "--r",
            "4",
            "--feature-map",
            "dijiang",
            "--chunk-size",
            "16",
            "--window",
            "8",
            "--sink-tokens",
            "2",
            "--output",
            out,
        )
        == 0
    )
    record = json.loads((out / "run.json").read_text())
    stages = {entry["stage"]: entry["loss"] for entry in record["held_out_loss"]}
    assert list(stages) == ["original", "linearized", "attention transfer", "fine-tuned"]
    assert (record["linearize_config"]["chunk_size"], record["linearize_config"]["window"]) == (16, 8)
    capsys.readouterr()
    linear, adapter = out / "linear_attention", out / "adapter"
    report = eval_report(
        capsys, "--model", tiny, "--linear-attention", linear, "--adapter", adapter, "--data", texts[1]
    )
    assert report["loss"] == pytest.approx(stages["fine-tuned"], rel=1e-4)


def test_linearize_with_window_dropout_on_few_cached_transfer_blocks(tiny, texts, tmp_path, capsys):
    out = tmp_path / "dropout"
    options = [*data_options(tiny, texts), "--transfer-steps", "3", "--finetune-steps", "3", "--output", out]
    hybrid = ["--window", "4", "--chunk-size", "8", "--transfer-blocks", "2", "--window-dropout", "0.5"]
    assert run_cli("linearize", *options, *hybrid, "--transfer-compare", "attention") == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["transfer_blocks"], record["window_dropout"], record["transfer_compare"]) == (2, 0.5, "attention")
    assert [entry["stage"] for entry in record["held_out_loss"]][-1] == "fine-tuned"
    capsys.readouterr()
    assert run_cli("linearize", *options, "--overwrite", "--window-dropout", "0.5") == 2
    assert "--window-dropout 0.5 needs a softmax window: add --window W" in capsys.readouterr().err
    assert run_cli("linearize", *options, "--overwrite", "--window", "4", "--window-dropout", "1") == 2
    assert "window_dropout=1.0 is not allowed: expected a number in [0, 1)" in capsys.readouterr().err
    assert run_cli("linearize", *options, "--overwrite", "--transfer-blocks", "0") == 2
    assert "transfer_blocks=0 is not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        run_cli("linearize", *options, "--overwrite", "--transfer-compare", "logits")
    assert done.value.code == 2
    assert "invalid choice: 'logits' (choose from 'output', 'attention')" in capsys.readouterr().err


def test_linearize_with_distillation_trains_on_another_loss_and_records_it(tiny, texts, tmp_path, capsys):
    options = [*data_options(tiny, texts), "--transfer-steps", "0", "--finetune-steps", "3", "--finetune-lr", "1e-2"]
    fine_tuned = {}
    for loss in ("lm", "distill"):
        out = tmp_path / loss
        assert run_cli("linearize", *options, "--window", "4", "--finetune-loss", loss, "--output", out) == 0
        record = json.loads((out / "run.json").read_text())
        assert record["finetune_loss"] == loss
        fine_tuned[loss] = record["held_out_loss"][-1]["loss"]
    assert fine_tuned["lm"] != pytest.approx(fine_tuned["distill"], rel=1e-6)
    untuned = tmp_path / "untuned"
    assert (
        run_cli("linearize", *options, "--finetune-steps", "0", "--finetune-loss", "distill", "--output", untuned) == 0
    )
    assert json.loads((untuned / "run.json").read_text())["finetune_loss"] is None  # nothing was fine-tuned
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_cli("linearize", *options, "--finetune-loss", "kl", "--output", tmp_path / "bad")
    assert done.value.code == 2
    assert "invalid choice: 'kl' (choose from 'lm', 'distill')" in capsys.readouterr().err


def test_topic_accuracy_on_bbc_news(tiny, capsys):
    assert run_cli("eval", "--model", tiny, "--task", "topic", "--max-examples", "3") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["examples"] == 3 and 0.0 <= report["accuracy"] <= 1.0 and report["chance"] == 0.2


def test_bench_runs_the_benchmark_script_of_the_checkout_with_the_arguments(monkeypatch):
    calls = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(commands.subprocess, "run", fake_run)
    monkeypatch.chdir(Path(__file__).parents[2])
    script = str(Path.cwd() / "benchmarks" / "adapters.py")
    assert run_cli("bench", "--workload", "synthetic", "--rounds", "3") == 0
    assert run_cli("bench", "--", "--help") == 0
    assert calls == [
        [sys.executable, script, "--workload", "synthetic", "--rounds", "3"],
        [sys.executable, script, "--help"],
    ]


def test_bench_outside_a_checkout_says_where_to_run_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("bench") == 1
    assert "root of a source checkout" in capsys.readouterr().err


def test_python_dash_m_slimtune():
    done = subprocess.run(
        [sys.executable, "-m", "slimtune", "export", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "usage: slimtune export" in done.stdout


@pytest.mark.slow
def test_finetune_defaults_train_a_short_bone_run_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("finetune", "--no-progress") == 0
    record = json.loads((tmp_path / "runs" / "finetune" / "run.json").read_text())
    assert record["adapter_config"]["method"] == "disha" and record["adapter_config"]["variant"] == "bone"
    assert len(record["losses"]) == 20 and record["eval_losses"]["20"] < record["losses"][0]


def test_step_peak_bytes_counts_resident_state_and_grows_with_the_batch():
    from slimtune.app.compare import step_peak_bytes

    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4))
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    small, large = (step_peak_bytes(model, torch.zeros(b, 16, dtype=torch.long)) for b in (1, 8))
    assert resident < small < large
    assert all(p.grad is None for p in model.parameters())


def test_smoothed_losses_are_trailing_means():
    from slimtune.app.compare import smoothed

    values = [4.0, 2.0, 6.0, 1.0, 3.0, 5.0, 0.5]
    expected = [sum(values[max(0, i - 2) : i + 1]) / len(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert smoothed(values, window=3) == pytest.approx(expected)
    assert smoothed([], window=3) == []
