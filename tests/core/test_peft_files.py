"""PEFT adapter folders both ways: slimtune's export loads in PEFT, PEFT's save_pretrained imports into slimtune.

Every check compares logits with PEFT 0.21.2 itself (``PeftModel.from_pretrained``, ``get_peft_model`` +
``save_pretrained``, ``AutoPeftModelForCausalLM``), never slimtune with itself.
"""

from __future__ import annotations

import json
import math
import re

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import slimtune as st
from cases import (
    adapted_copy,
    assert_unchanged,
    build,
    model_input,
    model_output,
    randomize_adapters,
    relative_error,
    snapshot,
    tiny_llama,
    tiny_mlp,
)
from slimtune.export import export_peft
from slimtune.peft_import import import_peft

TOL = {"rtol": 1e-5, "atol": 1e-5}
MLP = ["fc1", "fc2"]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (model kind, slimtune config, the PEFT config with the same math)
CASES = {
    "lora_mlp": ("mlp", st.LoraConfig(r=4, alpha=8.0, target_modules=MLP), peft.LoraConfig(r=4, lora_alpha=8)),
    "lora_llama": ("llama", st.LoraConfig(r=4, alpha=8.0, target_modules=LLAMA), peft.LoraConfig(r=4, lora_alpha=8)),
    "lora_gpt2": ("gpt2", st.LoraConfig(r=4, alpha=8.0), peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True)),
    "lora_rslora": (
        "llama",
        st.LoraConfig(r=4, alpha=8.0, use_rslora=True, target_modules=LLAMA),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True),
    ),
    "lora_sp": ("llama", st.LoraSpConfig(r=4, alpha=8.0, target_modules=LLAMA), None),
    "lora_sp_gpt2": ("gpt2", st.LoraSpConfig(r=4, alpha=8.0, granularity="rank"), None),
    "bone_mlp": ("mlp", st.DishaConfig(r=6, target_modules=MLP), peft.MissConfig(r=6)),
    "bone_padded_mlp": ("mlp", st.DishaConfig(r=4, target_modules=MLP), peft.MissConfig(r=4)),
    "bone_padded_llama": ("llama", st.DishaConfig(r=5, target_modules=LLAMA), peft.MissConfig(r=5)),
    "bat_col_mlp": (
        "mlp",
        st.DishaConfig(r=6, variant="bat_col", target_modules=MLP),
        peft.MissConfig(r=6, init_weights="bat"),
    ),
    "bat_col_llama": (
        "llama",
        st.DishaConfig(r=6, variant="bat_col", target_modules=LLAMA),
        peft.MissConfig(r=6, init_weights="bat"),
    ),
    "mini_llama": (
        "llama",
        st.DishaConfig(r=6, variant="mini", mini_r=3, target_modules=LLAMA),
        peft.MissConfig(r=6, init_weights="mini", mini_r=3),
    ),
    "c3a_mlp": (
        "mlp",
        st.SurmConfig(structure="circulant", block_size=6, alpha=0.5, target_modules=MLP),
        peft.C3AConfig(block_size=6),
    ),
    "c3a_llama": (
        "llama",
        st.SurmConfig(structure="circulant", block_size=12, alpha=2.0, target_modules=LLAMA),
        peft.C3AConfig(block_size=12),
    ),
    # block_size None: each layer's gcd (48 for q/o, 24 for the others), exported with a block_size_pattern
    "c3a_gcd_llama": ("llama", st.SurmConfig(structure="circulant", alpha=0.5, target_modules=LLAMA), None),
}


def targets_of(kind: str) -> list[str] | str:
    return {"mlp": MLP, "llama": LLAMA, "gpt2": ["c_attn", "c_proj", "c_fc"]}[kind]


def read_config(directory) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def peft_random_model(kind: str, peft_config, adapter_name: str = "default", seed: int = 3) -> nn.Module:
    """A PEFT model whose adapter weights are random (PEFT's identity init would make any import look right)."""
    peft_config.target_modules = targets_of(kind)
    model = peft.get_peft_model(build(kind), peft_config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert re.search(r"lora_|miss_|c3a_", name)
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_the_same_logits(case, tmp_path):
    kind, config, _ = CASES[case]
    model = adapted_copy(build(kind), config)
    randomize_adapters(model)
    inputs = model_input(model)
    expected = model_output(model, inputs)
    export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(build(kind), tmp_path)
    torch.testing.assert_close(model_output(loaded, inputs), expected, **TOL)
    back = import_peft(build(kind), tmp_path)
    torch.testing.assert_close(model_output(back, inputs), expected, **TOL)


@pytest.mark.parametrize("case", [name for name, (_, _, peft_config) in CASES.items() if peft_config is not None])
def test_peft_save_pretrained_imports_with_peft_logits(case, tmp_path):
    kind, _, peft_config = CASES[case]
    peft_model = peft_random_model(kind, peft_config)
    inputs = model_input(build(kind))
    with torch.no_grad():
        expected = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    model = import_peft(build(kind), tmp_path, adapter_name="imported")
    assert st.active_adapters(model) == ["imported"]
    torch.testing.assert_close(model_output(model, inputs), expected, **TOL)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.imported." in name for name in trainable)


def test_c3a_with_each_layer_at_its_gcd_imports_as_block_size_none(tmp_path):
    """PEFT C3A with a block_size_pattern giving q/o_proj 48 and the rest 24 = slimtune's default block size."""
    pattern = {"q_proj": 48, "o_proj": 48}
    peft_model = peft_random_model("llama", peft.C3AConfig(block_size=24, block_size_pattern=pattern))
    inputs = model_input(tiny_llama())
    with torch.no_grad():
        expected = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    model = import_peft(tiny_llama(), tmp_path)
    assert st.adapter_configs(model)["default"].block_size is None
    torch.testing.assert_close(model_output(model, inputs), expected, **TOL)


def test_an_adapter_not_named_default_is_found_in_its_subfolder(tmp_path):
    peft_model = peft_random_model("mlp", peft.LoraConfig(r=4, lora_alpha=8), adapter_name="other")
    inputs = model_input(tiny_mlp())
    with torch.no_grad():
        expected = model_output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(st.AdapterFileError, match=r"subfolders \['other'\]"):
        import_peft(tiny_mlp(), tmp_path)
    model = import_peft(tiny_mlp(), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(model_output(model, inputs), expected, **TOL)


def test_auto_peft_model_loads_an_export_with_its_base_model(tmp_path):
    """task_type CAUSAL_LM and an absolute base_model_name_or_path: AutoPeftModelForCausalLM needs nothing more."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = st.get_adapted_model(model, st.LoraConfig(r=4, alpha=8.0))
    randomize_adapters(model)
    inputs = model_input(model)
    expected = model_output(model, inputs)
    export_peft(model, tmp_path / "adapter")
    written = read_config(tmp_path / "adapter")
    assert written["task_type"] == "CAUSAL_LM" and written["peft_type"] == "LORA"
    assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    torch.testing.assert_close(model_output(loaded, inputs), expected, **TOL)


def small_llama(head: str, seed: int = 0) -> nn.Module:
    """A 1-layer Llama with the head ``head`` ("ForSequenceClassification", "Model") from a config."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=24, intermediate_size=36, num_hidden_layers=1, num_attention_heads=2
    )
    config.pad_token_id = 0
    torch.manual_seed(seed)
    return getattr(transformers, f"Llama{head}")(config).eval()


def any_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize(
    ("task_type", "make"),
    [
        ("CAUSAL_LM", lambda: build("gpt2")),  # GPT2LMHeadModel
        ("SEQ_CLS", lambda: small_llama("ForSequenceClassification")),
        ("FEATURE_EXTRACTION", lambda: small_llama("Model")),
        (None, tiny_mlp),
    ],
)
def test_task_type_follows_the_model_class_and_peft_loads_it(task_type, make, tmp_path):
    model = st.get_adapted_model(make(), st.LoraConfig(r=2, target_modules=r".*(c_attn|q_proj|fc1)"))
    randomize_adapters(model)
    if task_type == "SEQ_CLS":  # a head unlike the fresh base's: PEFT must take it from the file
        torch.nn.init.normal_(model.score.weight)
    inputs = model_input(model) if task_type is None else {"input_ids": torch.randint(1, 101, (2, 7))}
    expected = any_output(model, inputs)
    written = read_config(export_peft(model, tmp_path))
    assert written["task_type"] == task_type
    if task_type is None:
        assert written["auto_mapping"] == {"base_model_class": "TinyMLP", "parent_library": "cases"}
        assert written["base_model_name_or_path"] is None
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(any_output(loaded, inputs), expected, **TOL)
    imported = import_peft(make(), tmp_path)  # a SEQ_CLS head comes back as the adapter's modules_to_save copy
    torch.testing.assert_close(any_output(imported, inputs), expected, **TOL)
    if task_type == "SEQ_CLS":
        assert st.adapter_configs(imported)["default"].modules_to_save == ["score"]


def test_an_adapter_in_a_sequence_classifiers_head_is_refused(tmp_path):
    model = st.get_adapted_model(small_llama("ForSequenceClassification"), st.LoraConfig(r=2, target_modules=["score"]))
    with pytest.raises(st.ConfigError, match="module 'score' is the classification head"):
        export_peft(model, tmp_path / "out")


def test_block_sizes_at_each_layers_gcd_are_written_as_a_pattern(tmp_path):
    model = adapted_copy(tiny_llama(), CASES["c3a_gcd_llama"][1])
    written = read_config(export_peft(model, tmp_path))
    assert written["block_size"] == 24
    assert sorted(written["block_size_pattern"].values()) == [48] * 4  # q_proj and o_proj of 2 layers
    for name, layer in st.adapted_layers(model):
        keys = [key for key in written["block_size_pattern"] if re.match(rf".*\.{key}$", name)]  # C3A's matcher
        assert (written["block_size_pattern"][keys[0]] if keys else 24) == math.gcd(layer.d_in, layer.d_out)


@pytest.mark.parametrize(
    ("kind", "config", "match"),
    [
        ("mlp", st.DishaConfig(r=6, variant="bat_row"), "variant='bat_row' has no PEFT equivalent"),
        ("mlp", st.SurmConfig(structure="toeplitz", block_size=6), "structure='toeplitz' has no PEFT equivalent"),
        ("mlp", st.SurmConfig(structure="kronecker", r=6), "structure='kronecker' has no PEFT equivalent"),
        ("mlp", st.SurmAdapterConfig(block_size=6, target_modules=["fc2"]), "'surm_adapter' has no PEFT equivalent"),
        ("gpt2", st.DishaConfig(r=6), "PEFT's MISS adapts only nn.Linear"),
        ("gpt2", st.SurmConfig(block_size=6), "PEFT's C3A adapts only nn.Linear"),
    ],
)
def test_export_refuses_what_peft_cannot_express(kind, config, match, tmp_path):
    model = adapted_copy(build(kind), config)
    with pytest.raises(st.ConfigError, match=match):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_an_unknown_adapter_name_is_refused(tmp_path):
    model = adapted_copy(tiny_mlp(), st.LoraConfig(r=2))
    with pytest.raises(st.AdapterNameError, match="adapter_name='other'"):
        export_peft(model, tmp_path, adapter_name="other")


@pytest.fixture
def lora_export(tmp_path):
    """A LoRA export of TinyMLP (r=4 on fc1 and fc2) in ``tmp_path / "lora"``."""
    model = adapted_copy(tiny_mlp(), st.LoraConfig(r=4, target_modules=MLP))
    randomize_adapters(model)
    return export_peft(model, tmp_path / "lora")


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path)


def assert_import_fails(directory, error: type[Exception], match: str) -> None:
    """import_peft raises ``error`` matching ``match`` and leaves the model as it was."""
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        import_peft(model, directory)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "LOKR"}, r"peft_type='LOKR' is not allowed: slimtune imports \['LORA', 'MISS', 'C3A'\]"),
        ({"use_dora": True}, "use_dora=.True. is not allowed"),
        ({"lora_bias": True}, "lora_bias=.True. is not allowed"),
        ({"bias": "all"}, "bias='all' is not allowed"),
        ({"modules_to_save": "fc2"}, "modules_to_save='fc2' is not allowed: expected a list"),
        ({"layer_replication": [[0, 1]]}, "layer_replication="),
        ({"rank_pattern": {"fc2": 2}}, "rank_pattern="),
        ({"alpha_pattern": {"fc2": 2}}, "alpha_pattern="),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not allowed"),
        ({"some_future_option": "on"}, "some_future_option='on' is not allowed"),
    ],
)
def test_options_slimtune_cannot_express_are_refused(lora_export, changes, match):
    edit_config(lora_export, **changes)
    assert_import_fails(lora_export, st.ConfigError, match)


def test_neutral_and_descriptive_options_are_accepted(lora_export):
    edit_config(
        lora_export, rank_pattern={"fc2": 4}, layers_to_transform=[0], some_future_option=None, exclude_modules=["x"]
    )
    assert st.adapter_configs(import_peft(tiny_mlp(), lora_export))["default"].r == 4


def test_a_real_peft_dora_file_is_refused(tmp_path):
    peft_random_model("mlp", peft.LoraConfig(r=4, use_dora=True)).save_pretrained(tmp_path)
    assert_import_fails(tmp_path, st.ConfigError, "use_dora=.True. is not allowed")


def test_a_pickle_only_folder_is_refused_unread(lora_export):
    (lora_export / "adapter_model.safetensors").unlink()
    (lora_export / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    assert_import_fails(lora_export, st.AdapterFileError, "safe_serialization=True")


def test_a_missing_config_is_refused(lora_export):
    (lora_export / "adapter_config.json").unlink()
    assert_import_fails(lora_export, st.AdapterFileError, "adapter_config.json does not exist")


def test_a_slimtune_adapter_folder_is_pointed_to_load_adapter(tmp_path):
    model = adapted_copy(tiny_mlp(), st.LoraConfig(r=2))
    st.save_adapter(model, tmp_path)
    assert_import_fails(tmp_path, st.AdapterFileError, "is a slimtune adapter, not a PEFT one: load it with")


def test_a_tensor_of_the_wrong_shape_is_named(lora_export):
    edit_tensors(lora_export, lambda t: t.update({"base_model.model.fc2.lora_A.weight": torch.zeros(4, 43)}))
    assert_import_fails(lora_export, st.AdapterFileError, r"fc2.lora_A.weight saved \(4, 43\) vs model \(4, 42\)")


def test_a_missing_tensor_is_named(lora_export):
    edit_tensors(lora_export, lambda t: t.pop("base_model.model.fc2.lora_B.weight"))
    assert_import_fails(lora_export, st.AdapterFileError, r"missing: \['base_model.model.fc2.lora_B.weight'\]")


def test_a_tensor_slimtune_cannot_read_is_named(lora_export):
    edit_tensors(lora_export, lambda t: t.update({"base_model.model.fc2.lora_magnitude_vector": torch.ones(18)}))
    assert_import_fails(lora_export, st.AdapterFileError, "fc2.lora_magnitude_vector.*cannot read")


def test_a_file_for_another_model_names_the_missing_module(tmp_path):
    peft_random_model("llama", peft.LoraConfig(r=4, lora_alpha=8)).save_pretrained(tmp_path)
    assert_import_fails(
        tmp_path,
        st.AdapterFileError,
        r"TinyMLP lacks \['model.layers.0.mlp.down_proj', .* and 9 more: the file was saved for another model",
    )


def test_a_file_for_a_module_that_cannot_be_adapted_is_refused(lora_export):
    edit_tensors(lora_export, lambda t: t.update({"base_model.model.act.lora_A.weight": torch.zeros(4, 42)}))
    assert_import_fails(lora_export, st.AdapterFileError, r"cannot adapt \['act \(GELU\)'\]")


def test_c3a_block_sizes_slimtune_cannot_express_are_refused(tmp_path):
    peft_random_model("mlp", peft.C3AConfig(block_size=6, block_size_pattern={"fc2": 3})).save_pretrained(tmp_path)
    assert_import_fails(tmp_path, st.ConfigError, r"block sizes \[3, 6\] differ between modules")


@pytest.mark.slow
def test_smollm2_lora_export_loads_with_auto_peft_model(tmp_path):
    """The bundled SmolLM2's export names its cache folder, so AutoPeftModelForCausalLM loads it as it is."""
    from slimtune.app.models import load_model

    model, _ = load_model("smollm2")
    model = st.get_adapted_model(model, st.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.02)
    inputs = {"input_ids": torch.tensor([[1, 504, 3575, 282, 4649, 314]])}
    with torch.no_grad():
        expected = model_output(model, inputs)
    export_peft(model, tmp_path)
    assert read_config(tmp_path)["base_model_name_or_path"] == model.config._name_or_path
    as_stored = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path)  # the cache's float16 weights
    with torch.no_grad():
        assert relative_error(model_output(as_stored.eval(), inputs).float(), expected) < 1e-2
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded.eval(), inputs), expected, **TOL)
