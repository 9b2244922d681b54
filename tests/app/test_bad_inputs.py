"""The bad-input matrix: every method and public entry point against the inputs a user gets wrong.

Each case names the call, the documented exception type (``slimtune.errors``, or ``DataError`` for data) and
the pieces its message must hold: the field and the value, plus what is allowed. Every failed
``get_adapted_model`` / ``load_adapter`` must leave the model exactly as it was: state_dict, module types,
``requires_grad`` flags and the adapters already there (active and trainable) are compared before and after.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import slimtune as st
from cases import assert_unchanged, snapshot, tiny_llama, tiny_mlp
from slimtune.errors import DataError
from slimtune.linear_attention import LinearizeConfig, build_feature_map, get_linear_attention_op
from slimtune.training import TrainConfig, evaluate_lm, train
from slimtune.training.data import pack_for_lm, read_text_file

ALLOWED_WORDS = ("allowed", "expected", "needs")


def surm_config(structure: str, **overrides: object) -> st.SurmConfig:
    return st.SurmConfig(**{"structure": structure, "block_size": 6, "r": 6, **overrides})


# Every method and variant, by a factory taking overrides; the tiny MLP is 30 -> 42 -> 18.
METHODS: dict[str, Callable[..., st.AdapterConfig]] = {
    "lora": lambda **kw: st.LoraConfig(**{"r": 4, **kw}),
    "lora_sp": lambda **kw: st.LoraSpConfig(**{"r": 4, **kw}),
    "bone": lambda **kw: st.DishaConfig(**{"r": 6, **kw}),
    "mini": lambda **kw: st.DishaConfig(**{"r": 6, "variant": "mini", "mini_r": 3, **kw}),
    "bat_col": lambda **kw: st.DishaConfig(**{"r": 6, "variant": "bat_col", **kw}),
    "bat_row": lambda **kw: st.DishaConfig(**{"r": 6, "variant": "bat_row", **kw}),
    **{
        f"surm_{s}": functools.partial(surm_config, s)
        for s in ("circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "kronecker", "ldr")
    },
    "surm_adapter": lambda **kw: st.SurmAdapterConfig(**{"block_size": 6, "target_modules": ["fc1", "fc2"], **kw}),
    "bottleneck": lambda **kw: st.BottleneckConfig(**{"r": 5, "target_modules": ["fc1", "fc2"], **kw}),
}

# (method, config overrides) -> the message parts of the ShapeError get_adapted_model raises on the tiny MLP.
# LoRA and LoRA-SP accept r > min(d_in, d_out) as PEFT does (tests/core/test_errors.py checks the warning).
SHAPE_CASES = {
    ("bone", "r too large"): ({"r": 31}, ["r=31", "d_in=30", "1 <= r <= 30"]),
    ("mini", "r too large"): ({"r": 31}, ["r=31", "d_in=30", "1 <= r <= 30"]),
    ("mini", "mini_r not dividing"): ({"mini_r": 4}, ["mini_r=4", "d_out=42", "allowed mini_r"]),
    ("bat_col", "r too large"): ({"r": 43}, ["r=43", "d_in=30", "allowed r here: [1, 2, 3, 6]"]),
    ("bat_col", "r not dividing"): ({"r": 5}, ["r=5", "d_out=42", "allowed r here: [1, 2, 3, 6]"]),
    ("bat_row", "r too large"): ({"r": 43}, ["r=43", "d_in=30", "allowed r here: [1, 2, 3, 6]"]),
    ("bat_row", "r not dividing"): ({"r": 4}, ["r=4", "d_in=30", "allowed r here: [1, 2, 3, 6]"]),
    ("surm_kronecker", "r too large"): ({"r": 43}, ["r=43", "d_in=30", "allowed r here: [1, 2, 3, 6]"]),
    ("surm_kronecker", "r not dividing"): ({"r": 4}, ["r=4", "d_in=30", "allowed r here: [1, 2, 3, 6]"]),
    **{
        (f"surm_{s}", why): ({"block_size": b}, [f"block_size={b}", "d_in=30", "d_out=42", "allowed: 1, 2, 3, 6"])
        for s in ("circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "ldr")
        for why, b in (("block too large", 43), ("block not dividing", 4))
    },
    ("surm_adapter", "block too large"): ({"block_size": 43}, ["block_size=43", "d_out=42", "allowed: 1, 2, 3, 6, 7"]),
    ("surm_adapter", "block not dividing"): ({"block_size": 4}, ["block_size=4", "d_out=42", "allowed: 1, 2, 3, 6, 7"]),
}


def check_message(error: BaseException, named: list[str]) -> None:
    message = str(error)
    assert all(part in message for part in named), (named, message)
    assert any(word in message for word in ALLOWED_WORDS), message


def with_adapter(model: nn.Module) -> nn.Module:
    """The model carrying an active LoRA adapter ``first`` already (a failed second injection must keep it)."""
    return st.get_adapted_model(model, st.LoraConfig(r=2, target_modules=["fc1"]), "first")


@pytest.fixture(params=["plain", "adapted"])
def victim(request) -> nn.Module:
    return tiny_mlp() if request.param == "plain" else with_adapter(tiny_mlp())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("r", [0, -2, 2.5, True])
def test_r_that_is_not_a_positive_integer(method, r):
    field = "block_size" if method.startswith("surm") and method != "surm_kronecker" else "r"
    with pytest.raises(st.ConfigError) as info:
        METHODS[method](**{field: r})
    check_message(info.value, [f"{field}={r!r}", "positive integer"])


@pytest.mark.parametrize(("method", "why"), sorted(SHAPE_CASES))
def test_r_that_does_not_fit_a_layer_leaves_the_model_unchanged(method, why, victim):
    overrides, named = SHAPE_CASES[(method, why)]
    before = snapshot(victim)
    with pytest.raises(st.ShapeError) as info:
        st.get_adapted_model(victim, METHODS[method](**overrides), "second")
    check_message(info.value, named)
    assert_unchanged(victim, before)


UNKNOWN_NAMES = [
    (lambda: st.DishaConfig(variant="bat"), "variant='bat'", "bat_col"),
    (lambda: st.SurmConfig(structure="circulent"), "structure='circulent'", "circulant"),
    (lambda: st.SurmAdapterConfig(activation="tanh"), "activation='tanh'", "gelu"),
    (lambda: st.BottleneckConfig(activation="tanh"), "activation='tanh'", "relu"),
    (lambda: st.LoraConfig(init="xavier"), "init='xavier'", "kaiming"),
    (lambda: st.LoraSpConfig(granularity="row"), "granularity='row'", "element"),
    (lambda: st.config_from_dict({"method": "dora", "r": 4}), "method='dora'", "lora_sp"),
    (lambda: st.config_from_dict({"method": "lora", "rank": 4}), "['rank']", "'r'"),
    (lambda: LinearizeConfig(feature_map="cosformer"), "feature_map='cosformer'", "dijiang"),
    (lambda: LinearizeConfig(op="flash"), "op='flash'", "chunked"),
    (lambda: build_feature_map("cosformer", 8, 2), "'cosformer'", "performer"),
    (lambda: get_linear_attention_op("flash"), "'flash'", "recurrent"),
]


@pytest.mark.parametrize(("call", "value", "an_allowed_name"), UNKNOWN_NAMES, ids=[c[1] for c in UNKNOWN_NAMES])
def test_unknown_names_list_the_allowed_ones(call, value, an_allowed_name):
    with pytest.raises(st.ConfigError) as info:
        call()
    check_message(info.value, [value, an_allowed_name])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("targets", "named"),
    [
        (["q_proj"], ["target_modules=['q_proj']", "matched no adaptable module", "fc1"]),
        (r"layers\.\d+", ["target_modules='layers\\\\.\\\\d+'", "matched no adaptable module", "fc2"]),
        (["act"], ["'act' of type GELU", "allowed types are nn.Linear"]),
    ],
)
def test_target_modules_that_match_nothing_or_a_non_linear_module(method, targets, named, victim):
    before = snapshot(victim)
    with pytest.raises(st.TargetModulesError) as info:
        st.get_adapted_model(victim, METHODS[method](target_modules=targets), "second")
    check_message(info.value, named)
    assert_unchanged(victim, before)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("width", [29, 31])
def test_an_input_of_the_wrong_last_dimension(method, width):
    model = st.get_adapted_model(tiny_mlp(), METHODS[method]())
    with pytest.raises(st.ShapeError) as info:
        model(torch.randn(2, width))
    check_message(info.value, [f"last dimension {width}", "d_in=30"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_adapter_on_another_device_than_the_input(method):
    model = st.get_adapted_model(tiny_mlp(), METHODS[method]())
    for _, layer in st.adapted_layers(model):
        layer.adapters.to("meta")
    with pytest.raises(st.DeviceError) as info:
        model(torch.randn(2, 30))
    check_message(info.value, ["on device meta", "input on cpu", "one device"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_float32_adapter_on_a_bfloat16_base_computes_like_the_float32_model(method):
    """A dtype mismatch between adapter and base is allowed (as PEFT's float32 adapters): inputs are cast."""
    reference = st.get_adapted_model(tiny_mlp(), METHODS[method]())
    with torch.no_grad():
        for _, layer in st.adapted_layers(reference):
            for param in layer.adapters.parameters():
                param.add_(0.05)
    mixed = copy.deepcopy(reference).to(torch.bfloat16)
    for _, layer in st.adapted_layers(mixed):
        layer.adapters.float()
        layer.adapters.load_state_dict(dict(st.adapted_layers(reference))[_].adapters.state_dict())
    x = torch.randn(4, 30)
    out = mixed(x.to(torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in mixed.parameters() if p.requires_grad)
    torch.testing.assert_close(out.float(), reference(x).detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_float32_adapter_file_loads_into_a_bfloat16_model(method, tmp_path):
    """As float32 adapters on the bfloat16 base (PEFT's autocast_adapter_dtype), with bfloat16 outputs."""
    model = st.get_adapted_model(tiny_mlp(), METHODS[method]())
    st.save_adapter(model, tmp_path)
    loaded = st.load_adapter(tiny_mlp(dtype=torch.bfloat16), tmp_path)
    adapter_dtypes = {p.dtype for n, p in loaded.named_parameters() if ".adapters." in n}
    base_dtypes = {p.dtype for n, p in loaded.named_parameters() if ".adapters." not in n}
    assert adapter_dtypes == {torch.float32} and base_dtypes == {torch.bfloat16}
    output = loaded(torch.randn(2, 30, dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16 and output.isfinite().all()


ADAPTER_NAME_CASES = [
    (lambda m: st.get_adapted_model(m, st.LoraConfig(r=2), "first"), ["adapter_name='first' already exists"]),
    (lambda m: st.get_adapted_model(m, st.LoraConfig(r=2), "a.b"), ["adapter_name='a.b'", "without '.'"]),
    (lambda m: st.set_adapter(m, "nope"), ["unknown ['nope']", "the model has ['first']"]),
    (lambda m: st.set_adapter(m, []), ["adapter_names=[]", "the model has ['first']"]),
    (lambda m: st.delete_adapter(m, "nope"), ["adapter_name='nope'", "it has ['first']"]),
    (lambda m: st.merge_adapters(m, ["nope"]), ["unknown ['nope']", "the model has ['first']"]),
    (lambda m: st.save_adapter(m, "unused", "nope"), ["adapter_name='nope'", "it has ['first']"]),
]


@pytest.mark.parametrize(("call", "named"), ADAPTER_NAME_CASES, ids=[n[0] for _, n in ADAPTER_NAME_CASES])
def test_adapter_names_that_do_not_exist_or_exist_already(call, named):
    model = with_adapter(tiny_mlp())
    before = snapshot(model)
    with pytest.raises(st.AdapterNameError) as info:
        call(model)
    assert all(part in str(info.value) for part in named), str(info.value)
    assert_unchanged(model, before)


def llama() -> nn.Module:
    return st.get_adapted_model(tiny_llama(), st.LoraConfig(r=2, target_modules=["q_proj"]))


def blocks(n: int = 4, seq_len: int = 8, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return (torch.arange(n * seq_len) % 50).view(n, seq_len).to(dtype)


QUIET = {"steps": 1, "progress": False}
DATA_CASES = [
    (
        "train: empty dataset",
        lambda: train(llama(), blocks(0), TrainConfig(**QUIET)),
        st.ConfigError,
        ["blocks is empty"],
    ),
    (
        "train: seq_len=0",
        lambda: train(llama(), blocks(seq_len=0), TrainConfig(**QUIET)),
        st.ConfigError,
        ["seq_len=0", "seq_len >= 2"],
    ),
    (
        "train: seq_len=1",
        lambda: train(llama(), blocks(seq_len=1), TrainConfig(**QUIET)),
        st.ConfigError,
        ["seq_len=1", "seq_len >= 2"],
    ),
    (
        "train: float blocks",
        lambda: train(llama(), blocks(dtype=torch.float32), TrainConfig(**QUIET)),
        st.ConfigError,
        ["dtype torch.float32", "integer token ids"],
    ),
    (
        "train: 1-D blocks",
        lambda: train(llama(), blocks()[0], TrainConfig(**QUIET)),
        st.ConfigError,
        ["shape (8,)", "[n_blocks, seq_len]"],
    ),
    (
        "train: ids past the vocabulary",
        lambda: train(llama(), blocks() + 100, TrainConfig(**QUIET)),
        st.ConfigError,
        ["token ids 100 .. 131", "0 .. 100"],
    ),
    (
        "train: empty eval_blocks",
        lambda: train(llama(), blocks(), TrainConfig(**QUIET), blocks(0)),
        st.ConfigError,
        ["eval_blocks is empty"],
    ),
    (
        "train: no trainable parameter",
        lambda: train(tiny_llama().requires_grad_(False), blocks(), TrainConfig(**QUIET)),
        st.ConfigError,
        ["no trainable parameter", "inject an adapter"],
    ),
    ("evaluate_lm: empty dataset", lambda: evaluate_lm(llama(), blocks(0)), st.ConfigError, ["blocks is empty"]),
    ("TrainConfig: steps=0", lambda: TrainConfig(steps=0), st.ConfigError, ["steps=0", "positive integer"]),
    ("TrainConfig: lr=0", lambda: TrainConfig(lr=0.0), st.ConfigError, ["lr=0.0", "positive number"]),
    (
        "TrainConfig: batch_size=-1",
        lambda: TrainConfig(batch_size=-1),
        st.ConfigError,
        ["batch_size=-1", "positive integer"],
    ),
    (
        "TrainConfig: resume without output_dir",
        lambda: TrainConfig(resume=True),
        st.ConfigError,
        ["resume=True", "needs output_dir"],
    ),
    (
        "pack_for_lm: seq_len=0",
        lambda: pack_for_lm(["a b"], _Tokenizer(), 0),
        st.ConfigError,
        ["seq_len=0", "positive integer"],
    ),
    (
        "pack_for_lm: seq_len=-4",
        lambda: pack_for_lm(["a b"], _Tokenizer(), -4),
        st.ConfigError,
        ["seq_len=-4", "positive integer"],
    ),
    (
        "pack_for_lm: empty dataset",
        lambda: pack_for_lm([], _Tokenizer(), 8),
        DataError,
        ["no texts", "expected at least one"],
    ),
    (
        "pack_for_lm: too short",
        lambda: pack_for_lm(["a"], _Tokenizer(), 8),
        DataError,
        ["seq_len=8", "not one full block"],
    ),
    (
        "linear attention: T=0",
        lambda: get_linear_attention_op("chunked")(*[torch.zeros(1, 2, 0, 4)] * 3),
        st.ShapeError,
        ["T must be at least 1", "(1, 2, 0, 4)"],
    ),
    (
        "linear attention: chunk_size=0",
        lambda: LinearizeConfig(chunk_size=0),
        st.ConfigError,
        ["chunk_size=0", "positive int"],
    ),
]


class _Tokenizer:
    """Whitespace words → ids 2, 3, ...; EOS 1."""

    eos_token_id = 1

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[2 + i for i, _ in enumerate(text.split())] for text in texts]}


@pytest.mark.parametrize(("what", "call", "error", "named"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_and_training_settings(what, call, error, named):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert all(part in message for part in named), (named, message)


def test_an_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text in the file; expected at least one non-empty document"):
        read_text_file(tmp_path / "empty.txt")
