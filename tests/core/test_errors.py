"""Bad input gets a clear error of a documented type naming the field, the value and what is allowed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import slimtune as st
from cases import CASES, TinyMLP, randomize_adapters, tiny_mlp

BAD_CONFIGS = [
    (st.LoraConfig, {"r": 0}, "r=0"),
    (st.LoraConfig, {"r": -3}, "r=-3"),
    (st.LoraConfig, {"r": 2.5}, "r=2.5"),
    (st.LoraConfig, {"r": True}, "r=True"),
    (st.LoraConfig, {"alpha": 0}, "alpha=0"),
    (st.LoraConfig, {"dropout": 1.0}, "dropout=1.0"),
    (st.LoraConfig, {"dropout": -0.1}, "dropout=-0.1"),
    (st.LoraConfig, {"init": "orthogonal"}, "init='orthogonal'"),
    (st.LoraConfig, {"use_rslora": "yes"}, "use_rslora='yes'"),
    (st.LoraConfig, {"target_modules": []}, "target_modules=[]"),
    (st.LoraConfig, {"target_modules": "q_proj("}, "not a valid regular expression"),
    (st.DishaConfig, {"variant": "bat"}, "variant='bat'"),
    (st.DishaConfig, {"mini_r": 0}, "mini_r=0"),
    (st.DishaConfig, {"variant": "bat_col", "dropout": 0.1}, "dropout=0.1"),
    (st.DishaConfig, {"variant": "bat_row", "dropout": 0.1}, "dropout=0.1"),
]


@pytest.mark.parametrize(("config_class", "kwargs", "named"), BAD_CONFIGS)
def test_bad_config_values(config_class, kwargs, named):
    with pytest.raises(st.ConfigError) as info:
        config_class(**kwargs)
    assert named in str(info.value)
    assert "allowed" in str(info.value) or "expected" in str(info.value)


BAD_SHAPES = [
    (st.DishaConfig(r=5, variant="bat_col"), "r=5 does not divide d_out=42 of 'fc1'"),
    (st.DishaConfig(r=7, variant="bat_row"), "r=7 does not divide d_in=30"),
    (st.DishaConfig(r=31, variant="bone"), "r=31 is larger than d_in=30"),
    (st.DishaConfig(r=6, variant="mini", mini_r=4), "mini_r=4 does not divide d_out=42"),
]


@pytest.mark.parametrize(("config", "named"), BAD_SHAPES)
def test_shapes_that_do_not_fit_fail_and_leave_the_model_unchanged(config, named):
    model = tiny_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(st.ShapeError, match=named.replace("(", r"\(")) as info:
        st.get_adapted_model(model, config)
    assert "allowed" in str(info.value)
    assert not list(st.adapted_layers(model))
    assert st.adapter_configs(model) == {}
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("config_class", [st.LoraConfig, st.LoraSpConfig])
def test_a_rank_above_a_layer_dimension_is_capped_with_one_warning(config_class):
    """As PEFT: r=19 on fc2 (42 -> 18) keeps A (19, 42) and B (18, 19); one warning names fc2, r and 18."""
    model = tiny_mlp()
    with pytest.warns(UserWarning) as record:
        st.get_adapted_model(model, config_class(r=19))
    messages = [str(w.message) for w in record if "min(d_in, d_out)" in str(w.message)]
    assert len(messages) == 1, messages
    assert "r=19" in messages[0] and "'fc2' (min(d_in, d_out)=18)" in messages[0] and "'fc1'" not in messages[0]
    adapter = dict(st.adapted_layers(model))["fc2"].adapter("default")
    a, b = adapter.saved_tensors()["lora_A"], adapter.saved_tensors()["lora_B"]
    assert a.shape == (19, 42) and b.shape == (18, 19)


def test_target_modules_that_match_nothing_list_existing_names():
    with pytest.raises(st.TargetModulesError) as info:
        st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2, target_modules=["q_proj"]))
    message = str(info.value)
    assert "target_modules=['q_proj']" in message and "fc1" in message and "fc2" in message


def test_target_modules_matching_a_non_linear_module():
    with pytest.raises(st.TargetModulesError, match="'act' of type GELU"):
        st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2, target_modules=["act"]))


def test_regex_target_modules():
    model = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2, target_modules=r"fc\d"))
    assert [name for name, _ in st.adapted_layers(model)] == ["fc1", "fc2"]


def test_all_linear_skips_the_output_head():
    from cases import tiny_llama

    model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=2))
    names = [name for name, _ in st.adapted_layers(model)]
    assert "lm_head" not in names and len(names) == 2 * 7


def test_duplicate_and_unknown_adapter_names():
    model = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2), "a")
    with pytest.raises(st.AdapterNameError, match="adapter_name='a' already exists"):
        st.get_adapted_model(model, st.LoraConfig(r=2), "a")
    with pytest.raises(st.AdapterNameError, match="unknown \\['b'\\]"):
        st.set_adapter(model, "b")
    with pytest.raises(st.AdapterNameError, match="adapter_name='b' is not on the model"):
        st.delete_adapter(model, "b")
    with pytest.raises(st.AdapterNameError, match=r"without '\.'"):
        st.get_adapted_model(model, st.LoraConfig(r=2), "x.y")


def test_a_non_config_is_refused():
    with pytest.raises(st.ConfigError, match="expected an AdapterConfig"):
        st.get_adapted_model(tiny_mlp(), {"r": 4})


def test_unknown_method_and_unknown_fields():
    with pytest.raises(st.ConfigError, match="method='dora' is not known"):
        st.config_from_dict({"method": "dora", "r": 4})
    with pytest.raises(st.ConfigError, match=r"unknown field\(s\) \['rank'\]"):
        st.config_from_dict({"method": "lora", "rank": 4})


def test_delete_of_a_merged_adapter_is_refused():
    model = st.get_adapted_model(tiny_mlp(), st.LoraConfig(r=2))
    st.merge_adapters(model)
    with pytest.raises(st.MergeError, match="unmerge before deleting"):
        st.delete_adapter(model, "default")


class WiderMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 48)
        self.fc2 = nn.Linear(48, 18)


@pytest.fixture
def saved_bone(tmp_path):
    model = st.get_adapted_model(tiny_mlp(), CASES["bone"])
    randomize_adapters(model)
    return st.save_adapter(model, tmp_path / "bone")


def test_loading_into_other_shapes_names_module_and_both_shapes(saved_bone):
    model = WiderMLP()
    with pytest.raises(st.AdapterFileError, match=r"module 'fc1': .* 30 -> 42 .* this model's layer is 30 -> 48"):
        st.load_adapter(model, saved_bone)
    assert not list(st.adapted_layers(model))


def test_loading_into_a_model_without_the_modules(saved_bone):
    with pytest.raises(st.AdapterFileError, match="module 'fc1', which Sequential lacks"):
        st.load_adapter(nn.Sequential(nn.Linear(30, 42)), saved_bone)


def test_truncated_weights_file(saved_bone):
    weights = saved_bone / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(st.AdapterFileError, match="damaged or not a safetensors file"):
        st.load_adapter(tiny_mlp(), saved_bone)


def test_pickle_file_is_never_read(saved_bone):
    weights = saved_bone / "adapter_model.safetensors"
    torch.save({"fc1.block": torch.zeros(6, 42)}, weights)  # a pickle under the safetensors name
    with pytest.raises(st.AdapterFileError, match="damaged or not a safetensors file"):
        st.load_adapter(tiny_mlp(), saved_bone)


def test_missing_config_file(tmp_path):
    with pytest.raises(st.AdapterFileError, match=r"adapter_config\.json does not exist"):
        st.load_adapter(tiny_mlp(), tmp_path)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda meta: meta.pop("modules"), r"lacks the field\(s\) \['modules'\]"),
        (lambda meta: meta.update(format_version=99), "format_version=99"),
        (lambda meta: meta["config"].update(rank=3), r"unknown field\(s\) \['rank'\]"),
    ],
)
def test_bad_config_files(saved_bone, edit, named):
    path = saved_bone / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(st.AdapterFileError, match=named):
        st.load_adapter(tiny_mlp(), saved_bone)


def test_invalid_json(saved_bone):
    (saved_bone / "adapter_config.json").write_text("{not json")
    with pytest.raises(st.AdapterFileError, match="is not valid JSON"):
        st.load_adapter(tiny_mlp(), saved_bone)
