"""``slimtune linearize --softmax-layers`` / ``--rank-layers`` on the tiny 2-layer Llama folder, then ``slimtune eval
--linear-attention`` on the result; bad values end in one line on stderr, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimtune.app.cli as cli

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["--transfer-steps", "1", "--finetune-steps", "1", "--seq-len", "32", "--eval-blocks", "4"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "eval.txt"
    path.write_text("\n\n".join(f"a bird {i} flew over the hill {i + 2} and the fox hid" for i in range(20)))
    return path


def linearize(tiny: Path, text_file: Path, held_out: Path, out: Path, *options: str) -> dict:
    """Run ``slimtune linearize`` with the options; its run.json."""
    argv = ["linearize", "--model", tiny, "--data", text_file, "--eval-data", held_out, *STEPS, "--output", out]
    assert cli.main([str(a) for a in [*argv, *options]]) == 0
    return json.loads((out / "run.json").read_text())


def eval_loss(tiny: Path, folder: Path, held_out: Path, capsys: pytest.CaptureFixture[str]) -> float:
    capsys.readouterr()
    argv = ["eval", "--model", tiny, "--linear-attention", folder, "--data", held_out, "--seq-len", "32"]
    assert cli.main([str(a) for a in [*argv, "--max-blocks", "4"]]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]


def test_rank_layers_keeps_the_best_layer_softmax_and_eval_loads_it(tiny, text_file, held_out, tmp_path, capsys):
    out = tmp_path / "ranked"
    record = linearize(tiny, text_file, held_out, out, "--rank-layers", "1", "--window", "4", "--sink-tokens", "1")
    printed = capsys.readouterr().out
    assert "ranking 2 linearised layers by the loss on 4 held-out blocks (3 evaluations)" in printed
    assert "| layer | loss with its softmax restored | drop vs all-linear | kept as softmax |" in printed
    ranking = record["layer_ranking"]
    assert sorted(r["layer"] for r in ranking) == [0, 1] and ranking[0]["drop"] >= ranking[1]["drop"]
    assert [r["kept"] for r in ranking] == [True, False]
    assert record["linearize_config"]["softmax_layers"] == [ranking[0]["layer"]]
    stages = {entry["stage"]: entry["loss"] for entry in record["held_out_loss"]}
    assert stages["linearized"] == pytest.approx(ranking[0]["loss"], rel=1e-5)
    assert eval_loss(tiny, out / "linear_attention", held_out, capsys) == pytest.approx(stages["fine-tuned"], rel=1e-4)


def test_softmax_layers_option_and_a_ranking_of_the_rest(tiny, text_file, held_out, tmp_path, capsys):
    out = tmp_path / "fixed"
    record = linearize(tiny, text_file, held_out, out, "--softmax-layers", "1", "--rank-layers", "0")
    assert record["linearize_config"]["softmax_layers"] == [1]
    assert [(r["layer"], r["kept"]) for r in record["layer_ranking"]] == [(0, False)]
    stages = {entry["stage"]: entry["loss"] for entry in record["held_out_loss"]}
    assert eval_loss(tiny, out / "linear_attention", held_out, capsys) == pytest.approx(stages["fine-tuned"], rel=1e-4)


def test_rank_search_greedy_keeps_the_chosen_layer_and_records_the_steps(tiny, text_file, held_out, tmp_path, capsys):
    out = tmp_path / "greedy"
    options = ["--rank-layers", "1", "--rank-search", "greedy", "--window", "4", "--sink-tokens", "1"]
    record = linearize(tiny, text_file, held_out, out, *options)
    printed = capsys.readouterr().out
    assert "choosing 1 of 2 linearised layers one at a time by the loss on 4 held-out blocks (3 evaluations)" in printed
    assert "| step | layer | loss with the layers so far restored | drop vs the step before |" in printed
    (step,) = record["layer_ranking"]
    assert record["rank_search"] == "greedy" and step["kept"] and record["rank_passkey"] is None
    only = linearize(tiny, text_file, held_out, tmp_path / "only-1", *options, "--rank-candidates", "1")
    assert "choosing 1 of 1 linearised layers one at a time" in capsys.readouterr().out
    assert [s["layer"] for s in only["layer_ranking"]] == [1] and only["rank_candidates"] == [1]
    assert record["linearize_config"]["softmax_layers"] == [step["layer"]]
    stages = {entry["stage"]: entry["loss"] for entry in record["held_out_loss"]}
    assert stages["linearized"] == pytest.approx(step["loss"], rel=1e-5)
    assert eval_loss(tiny, out / "linear_attention", held_out, capsys) == pytest.approx(stages["fine-tuned"], rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rank-layers", "2"], "--rank-layers 2 is not allowed: this model has 2 linearised layers and at least one"),
        (["--rank-layers", "-1"], "--rank-layers -1 is not allowed"),
        (["--softmax-layers", "0", "--rank-layers", "1"], "--rank-layers 1 is not allowed: this model has 1 linear"),
        (["--softmax-layers", "2"], "softmax_layers=[2] is not allowed for this LlamaForCausalLM: it has 2 attention"),
        (["--softmax-layers", "0", "0"], "softmax_layers=[0, 0] is not allowed: expected a list of distinct integers"),
        (["--softmax-layers", "0", "1"], "leaving none to linearise"),
        (["--rank-search", "greedy"], "--rank-search greedy needs --rank-layers K (K >= 1)"),
        (["--rank-layers", "0", "--rank-search", "greedy"], "--rank-search greedy chooses nothing"),
        (["--rank-layers", "1", "--rank-candidates", "0"], "--rank-candidates needs --rank-layers K and --rank-search"),
        (["--rank-layers", "1", "--rank-search", "greedy", "--rank-candidates", "0", "5"], "[0, 5] is not allowed"),
        (["--rank-layers", "1", "--rank-search", "greedy", "--rank-candidates", "1", "1"], "(some repeat)"),
    ],
)
def test_bad_layer_options_end_in_one_line(tiny, text_file, held_out, tmp_path, capsys, options, message):
    argv = ["linearize", "--model", tiny, "--data", text_file, "--eval-data", held_out, *STEPS, *options]
    capsys.readouterr()
    assert cli.main([str(a) for a in [*argv, "--output", tmp_path / "bad"]]) == 2
    captured = capsys.readouterr()
    err = captured.err  # after the progress bar of loading the weights, one line
    last = err.strip().splitlines()[-1]
    assert last.startswith("slimtune linearize: error: ") and message in last and "Traceback" not in err
    assert "choosing" not in captured.out and "ranking" not in captured.out  # refused before any search is announced


def test_rank_layers_needs_held_out_data(tiny, text_file, tmp_path, capsys):
    argv = ["linearize", "--model", tiny, "--data", text_file, *STEPS, "--rank-layers", "1"]
    assert cli.main([str(a) for a in [*argv, "--output", tmp_path / "none"]]) == 2
    assert "--rank-layers needs held-out data" in capsys.readouterr().err


def test_a_layer_index_that_is_not_an_int_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["linearize", "--softmax-layers", "1", "x"])
    assert done.value.code == 2
    assert "argument --softmax-layers: 'x' is not allowed: expected an int" in capsys.readouterr().err


def test_rank_by_passkey_on_the_command_line(long_tiny, text_file, tmp_path, capsys):
    out = tmp_path / "passkey"
    steps = ["--transfer-steps", "1", "--finetune-steps", "1", "--seq-len", "32"]
    argv = ["linearize", "--model", long_tiny, "--data", text_file, *steps, "--window", "4", "--sink-tokens", "1"]
    ranked = [*argv, "--rank-layers", "1", "--rank-by", "passkey", "--rank-passkey-length", "280"]
    assert cli.main([str(a) for a in [*ranked, "--output", out]]) == 0
    printed = capsys.readouterr().out
    assert "ranking 2 linearised layers by the passkey loss on 6 prompts of 280 tokens" in printed
    assert "| layer | passkey loss with its softmax restored | drop vs all-linear | kept as softmax |" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["rank_by"] == "passkey" and [r["kept"] for r in record["layer_ranking"]] == [True, False]
    assert record["rank_passkey"] == {"length": 280, "depths": [0.1, 0.5, 0.9], "keys": 2}
    assert record["linearize_config"]["softmax_layers"] == [record["layer_ranking"][0]["layer"]]
    short = [*argv, "--rank-layers", "1", "--rank-by", "passkey", "--rank-passkey-length", "50"]
    assert cli.main([str(a) for a in [*short, "--output", tmp_path / "short"]]) == 2
    err = capsys.readouterr().err
    assert (
        "--rank-passkey-length 50 --rank-passkey-depths 0.1 0.5 0.9: total_tokens=50" in err and "Traceback" not in err
    )


def test_rank_passkey_depths_and_keys_choose_the_prompts(long_tiny, text_file, tmp_path, capsys):
    steps = ["--transfer-steps", "0", "--finetune-steps", "0", "--seq-len", "32"]
    argv = ["linearize", "--model", long_tiny, "--data", text_file, *steps, "--window", "4", "--sink-tokens", "1"]
    ranked = [*argv, "--rank-layers", "1", "--rank-by", "passkey", "--rank-passkey-length", "280"]
    losses = {}
    for name, prompts in (
        ("default", []),
        ("deep", ["--rank-passkey-depths", "0.1", "0.1", "--rank-passkey-keys", "1"]),
    ):
        assert cli.main([str(a) for a in [*ranked, *prompts, "--output", tmp_path / name]]) == 0
        record = json.loads((tmp_path / name / "run.json").read_text())
        losses[name] = [r["loss"] for r in record["layer_ranking"]]
    assert record["rank_passkey"] == {"length": 280, "depths": [0.1, 0.1], "keys": 1}
    assert "by the passkey loss on 2 prompts of 280 tokens" in capsys.readouterr().out
    assert losses["deep"] != losses["default"]  # the prompts the options name are the ones scored
    bad = [*ranked, "--rank-passkey-depths", "0.5", "1.5", "--output", tmp_path / "bad"]
    assert cli.main([str(a) for a in bad]) == 2
    err = capsys.readouterr().err
    assert (
        "--rank-passkey-length 280 --rank-passkey-depths 0.5 1.5: depth holds 1.5: allowed are fractions" in err
        and "Traceback" not in err
    )
    keys = [*ranked, "--rank-passkey-keys", "0", "--output", tmp_path / "no-keys"]
    assert cli.main([str(a) for a in keys]) == 2
    assert "rank_passkey_keys" in capsys.readouterr().err
