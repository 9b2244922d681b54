"""``--quantize``: QLoRA-style fine-tuning from the command line on a bitsandbytes-quantised base, then evaluation on
that base and a merge into the full-precision model."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune as st
from slimtune.adapters.quantized import quantization_of
from slimtune.app import cli
from slimtune.app.quantized_base import quantized_loading
from slimtune.errors import ConfigError

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: object) -> int:
    return cli.main([str(arg) for arg in argv])


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_finetune_resume_eval_and_merge_with_a_quantised_base(tiny, text_file, tmp_path, capsys, scheme):
    run, merged = tmp_path / "run", tmp_path / "merged"
    options = ["--model", tiny, "--data", text_file, "--seq-len", "32", "--method", "bone", "--r", "6"]
    train = ["finetune", *options, "--lr", "1e-2", "--output", run, "--no-progress", "--quantize", scheme]
    assert run_cli(*train, "--steps", "2", "--checkpoint-every", "1") == 0
    assert f"{scheme} linear layers" in capsys.readouterr().out
    assert run_cli(*train, "--steps", "3", "--resume") == 0
    record = json.loads((run / "run.json").read_text())
    assert record["base_quantization"] == scheme and record["start_step"] == 2 and len(record["losses"]) == 1
    evaluate = ["eval", "--model", tiny, "--adapter", run / "adapter", "--data", text_file, "--seq-len", "32"]
    capsys.readouterr()
    assert run_cli(*evaluate, "--quantize", scheme) == 0
    on_quantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on_quantized["quantize"] == scheme
    assert run_cli("merge", "--model", tiny, "--adapter", run / "adapter", "--output", merged) == 0
    capsys.readouterr()
    assert run_cli("eval", "--model", merged, "--data", text_file, "--seq-len", "32") == 0
    on_merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the adapter learnt on the quantised base; on the full-precision base it is as good within the base's rounding
    assert abs(on_merged["loss"] - on_quantized["loss"]) < 0.05


def test_the_quantised_model_loads_with_the_scheme_asked_for(tiny):
    from slimtune.app.models import load_causal_lm

    model, _ = load_causal_lm(tiny, torch.float32, "fp4")
    kinds = {quantization_of(m) for m in model.modules()} - {None}
    assert kinds == {"fp4"}
    assert model.lm_head.weight.dtype == torch.float32  # the head and embeddings keep --dtype
    with pytest.raises(st.MergeError, match="quantised"):
        st.merge_and_unload(st.get_adapted_model(model, st.LoraConfig(r=2)))


def test_careless_quantize_values_are_one_line(tiny, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("finetune", "--model", tiny, "--quantize", "int4")
    assert exit_info.value.code == 2
    assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="quantize='q3' is not allowed"):
        quantized_loading("q3", torch.float32)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'slimtune\[quant\]'"
    ):
        quantized_loading("nf4", torch.float32)
