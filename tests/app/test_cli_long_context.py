"""``slimtune eval --task passkey`` and ``--task position-loss`` on a tiny Llama folder (character tokenizer) that
reads 512 positions: the JSON line equals the library's result on the same loaded model, plain, linearised and
adapted; careless values end with one clear line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import slimtune as st
import slimtune.app.cli as cli
from slimtune.app.corpus import lm_blocks
from slimtune.app.models import load_causal_lm
from slimtune.linear_attention import LinearizeConfig, linearize, load_linearized, save_linearized
from slimtune.training.long_context import passkey_accuracy, position_losses

pytestmark = pytest.mark.usefixtures("one_thread")
PASSKEY = ["--task", "passkey", "--lengths", "260", "300", "--depths", "0.2", "0.8", "--keys", "2"]


@pytest.fixture(scope="module")
def converted(long_tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(linear-attention folder, LoRA adapter folder) for the tiny model: a hybrid with a 40-token window."""
    out = tmp_path_factory.mktemp("converted")
    model, _ = load_causal_lm(str(long_tiny))
    linearize(model, LinearizeConfig(window=40, sink_tokens=2, chunk_size=16))
    save_linearized(model, out / "linear")
    adapted = st.get_adapted_model(model, st.LoraConfig(r=2))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # a non-zero update, so the adapter changes the scores
            param.data.normal_(0, 0.1)
    st.save_adapter(adapted, out / "adapter")
    return out / "linear", out / "adapter"


def report_of(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    capsys.readouterr()
    assert cli.main(["eval", *(str(a) for a in argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def loaded(folder: Path, linear: Path | None = None, adapter: Path | None = None):
    model, tokenizer = load_causal_lm(str(folder))
    if linear:
        load_linearized(model, linear)
    if adapter:
        st.load_adapter(model, adapter)
    return model, tokenizer


def same_cells(reported: list[dict], expected: list[dict]) -> bool:
    return len(reported) == len(expected) and all(a == pytest.approx(b) for a, b in zip(reported, expected))


def test_passkey_reports_the_library_result(long_tiny, capsys):
    report = report_of(capsys, "--model", long_tiny, *PASSKEY)
    model, tokenizer = loaded(long_tiny)
    expected = passkey_accuracy(model, tokenizer, (260, 300), (0.2, 0.8), keys_per_cell=2).to_dict()
    assert report["task"] == "passkey" and report["window"] is None and report["needles_outside"] == 0
    assert [(c["length"], c["depth"], c["keys"]) for c in report["cells"]] == [
        (260, 0.2, 2),
        (260, 0.8, 2),
        (300, 0.2, 2),
        (300, 0.8, 2),
    ]
    assert same_cells(report["cells"], expected["cells"]) and report["accuracy"] == expected["accuracy"]


def test_passkey_on_a_linearised_adapted_model_splits_by_its_window(long_tiny, converted, capsys):
    linear, adapter = converted
    report = report_of(capsys, "--model", long_tiny, "--linear-attention", linear, "--adapter", adapter, *PASSKEY)
    model, tokenizer = loaded(long_tiny, linear, adapter)
    expected = passkey_accuracy(model, tokenizer, (260, 300), (0.2, 0.8), keys_per_cell=2, window=40).to_dict()
    assert report["window"] == 40 and report["linear_attention"] == str(linear)
    assert same_cells(report["cells"], expected["cells"])
    wider = report_of(capsys, "--model", long_tiny, "--linear-attention", linear, *PASSKEY, "--window", "120")
    assert wider["window"] == 120 and wider["needles_inside"] > 0 and wider["needles_outside"] > 0


def test_position_loss_reports_the_buckets_within_the_blocks(long_tiny, converted, capsys):
    argv = ["--model", long_tiny, "--task", "position-loss", "--split", "test", "--seq-len", "256", "--max-blocks", "2"]
    report = report_of(capsys, *argv)
    model, tokenizer = loaded(long_tiny)
    expected = position_losses(model, lm_blocks(tokenizer, "test", 256, 2))
    assert list(report["losses"]) == ["0-64", "64-256"] and (report["blocks"], report["seq_len"]) == (2, 256)
    assert report["losses"] == pytest.approx(expected)
    linear = report_of(capsys, *argv, "--linear-attention", converted[0])
    assert list(linear["losses"]) == ["0-64", "64-256"] and linear["losses"] != report["losses"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lengths", "1024"], "lengths asks for 1024 tokens: allowed are at most 512"),
        (["--lengths", "100"], "total_tokens=100 .* expected at least 251"),
        (["--depths", "1.5"], r"depths holds 1.5: allowed are fractions"),
        (["--depths", "-0.1"], r"depths=-0.1 is not allowed"),
        (["--keys", "0"], r"keys=0 is not allowed: expected a positive integer"),
        (["--window", "0"], r"window=0 is not allowed"),
        (["--task", "position-loss", "--seq-len", "1024"], "--seq-len asks for 1024 tokens: allowed are at most 512"),
        (["--task", "position-loss", "--seq-len", "32"], "seq_len=32 hold none of the buckets"),
        (["--task", "position-loss", "--data", "bbc-instruct"], "holds chat examples"),
    ],
)
def test_careless_values_end_with_one_clear_line(long_tiny, argv, message, capsys):
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(long_tiny), "--task", "passkey", "--keys", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert err.startswith("slimtune eval: error: ") and re.search(message, err), err
