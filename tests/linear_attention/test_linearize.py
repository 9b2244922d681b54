"""Conversion of HF models to linear attention: shared weights, only new parameters, errors, training, save/load.

The tiny models come from configs (no download) with sizes that are not powers of two: Llama, Qwen2 and Mistral
with GQA (4 query / 2 key-value heads, head_dim 12), GPT-NeoX with partial RoPE (rotary on 6 of 12 dims) and GPT-2
(fused Conv1D qkv, no RoPE). One slow test converts the real SmolLM2-135M and runs both recovery stages.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtune as st
from cases import TINY_DECODER, tiny_gpt2, tiny_llama
from slimtune.errors import AdapterFileError, ConfigError
from slimtune.linear_attention import (
    LinearAttention,
    LinearizeConfig,
    linear_attention_layers,
    linear_attention_parameters,
    linearize,
    load_linearized,
    save_linearized,
)
from slimtune.training import METRICS_FILE, TrainResult, evaluate_lm
from slimtune.training.checkpoint import checkpoint_root
from slimtune.training.recovery import attention_mse, attention_transfer, finetune

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "dense", "c_attn", "c_proj"]


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """A 2-layer Qwen2ForCausalLM: hidden 48, GQA 4/2 heads, q/k/v biases, vocab 101."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**TINY_DECODER, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def tiny_mistral(seed: int = 0) -> nn.Module:
    """A 2-layer MistralForCausalLM: hidden 48, GQA 4/2 heads, sliding window 8 (its cache layers are sliding)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**TINY_DECODER, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)
    return MistralForCausalLM(config).eval()


def tiny_neox(seed: int = 0) -> nn.Module:
    """A 2-layer GPTNeoXForCausalLM (Pythia layout): hidden 48, 4 heads, RoPE on half of each head, vocab 101."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(**TINY_DECODER, rotary_pct=0.5)
    return GPTNeoXForCausalLM(config).eval()


TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "neox": tiny_neox, "gpt2": tiny_gpt2}
PROJECTIONS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "neox": ("query_key_value", "dense"),
    "gpt2": ("c_attn", "c_proj"),
}


def token_blocks(n: int = 8, length: int = 19, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = ("LlamaAttention", "Qwen2Attention", "MistralAttention", "GPTNeoXAttention", "GPT2Attention")
    return {name: m for name, m in model.named_modules() if type(m).__name__ in kinds}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_conversion_shares_pretrained_weights_and_adds_only_new_parameters(arch):
    model = TINY[arch]()
    originals = attention_modules(model)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    keys_before = set(model.state_dict())
    linearize(model, LinearizeConfig(feature_map="hedgehog", output_gate=True))

    layers = dict(linear_attention_layers(model))
    assert set(layers) == set(originals) and not attention_modules(model)
    for name, layer in layers.items():
        for child in PROJECTIONS[arch]:
            assert getattr(layer, child) is getattr(originals[name], child)
            assert getattr(layer, child).weight.data_ptr() == getattr(originals[name], child).weight.data_ptr()
        assert layer.original is originals[name]
    after = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert {k: after[k] for k in before} == before
    new = {p.data_ptr() for p in linear_attention_parameters(model)}
    assert {after[k] for k in set(after) - set(before)} == new and len(new) == 2 * 5
    assert keys_before < set(model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_positional_arguments_follow_the_replaced_signature():
    model = linearize(tiny_neox())
    layer = model.gpt_neox.layers[0].attention
    hidden = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0))
    position_embeddings = model.gpt_neox.rotary_emb(hidden, torch.arange(7)[None])
    by_keyword = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)[0]
    by_position = layer(hidden, None, None, position_embeddings)[0]  # (hidden_states, attention_mask, layer_past, ...)
    assert torch.equal(by_position, by_keyword)
    with pytest.raises(ConfigError, match="GPTNeoXAttention uses RoPE: position_embeddings"):
        layer(hidden)


def test_unknown_architecture_names_the_attention_class_and_the_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=30,
            is_decoder=True,
        )
    )
    with pytest.raises(ConfigError, match=r"BertSelfAttention.*supported: \['GPT2Attention', 'GPTNeoXAttention'"):
        linearize(bert)
    with pytest.raises(ConfigError, match="attention classes found: none"):
        linearize(nn.Sequential(nn.Linear(3, 3)))


def test_a_model_is_linearised_once_and_the_config_is_checked():
    model = linearize(tiny_llama())
    with pytest.raises(ConfigError, match="already linearised"):
        linearize(model)
    with pytest.raises(ConfigError, match="expected a LinearizeConfig"):
        linearize(tiny_llama(), {"feature_map": "dijiang"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("feature_map", "cosformer"),
        ("m", 0),
        ("m", 2.0),
        ("op", "flash"),
        ("chunk_size", 0),
        ("decay", 1),
        ("normalize", "yes"),
        ("output_gate", None),
        ("share_feature_map", 0),
        ("seed", -1),
        ("window", -1),
        ("window", 2.0),
        ("sink_tokens", -1),
        ("window_mix", 0.0),
        ("window_mix", float("nan")),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r} is not allowed"):
        LinearizeConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    config = LinearizeConfig(feature_map="hedgehog", m=10, op="reference", chunk_size=7, decay=False, seed=3)
    assert LinearizeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"LinearizeConfig got unknown field\(s\) \['rank'\]"):
        LinearizeConfig.from_dict({**config.to_dict(), "rank": 4})
    with pytest.raises(ConfigError, match="m=7 is not allowed with feature_map='hedgehog'"):
        LinearizeConfig(feature_map="hedgehog", m=7)
    with pytest.raises(ConfigError, match="sink_tokens=4 is not allowed with window=0"):
        LinearizeConfig(sink_tokens=4)
    with pytest.raises(ConfigError, match="window=8 is not allowed with normalize=False"):
        LinearizeConfig(window=8, normalize=False)


@pytest.mark.parametrize("window", [0, 6], ids=["linear", "window"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_op_gives_the_same_logits(arch, window):
    ids = token_blocks(2, 23)
    logits = {}
    for op in ("reference", "chunked", "recurrent"):
        model = linearize(TINY[arch](), LinearizeConfig(op=op, chunk_size=5, window=window))
        logits[op] = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits["chunked"], logits["reference"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["recurrent"], logits["reference"], rtol=1e-5, atol=1e-5)


def perturbed_hedgehog(arch: str) -> nn.Module:
    """``TINY[arch]`` linearised with Hedgehog feature maps, the added parameters moved off their initial values so
    that every layer's linear output differs clearly from its softmax one."""
    model = linearize(TINY[arch](), LinearizeConfig(feature_map="hedgehog"))
    with torch.no_grad():
        for i, p in enumerate(linear_attention_parameters(model)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    return model


def reference_layer_mse(arch: str, model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Per layer of the linearised ``model``, written out without its teacher forcing: run the original model
    ``TINY[arch]`` on ``ids`` [B, T], give each layer's LinearAttention the arguments its softmax attention got
    there, and take the mean squared difference of the two outputs [B, T, D] (in float64)."""
    seen: dict[str, tuple] = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        seen[names[module]] = (args, kwargs, output[0])

    original = TINY[arch]()
    names = {module: name for name, module in attention_modules(original).items()}
    for module in names:
        module.register_forward_hook(keep, with_kwargs=True)
    layers = dict(linear_attention_layers(model))
    with torch.no_grad():
        original(ids, use_cache=False)
        outputs = {name: layers[name](*args, **kwargs)[0] for name, (args, kwargs, _) in seen.items()}
    return [((outputs[name].double() - target.double()) ** 2).mean().item() for name, (*_, target) in seen.items()]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_attention_mse_matches_a_hand_written_reference_and_leaves_the_model_as_it_was(arch):
    ids = token_blocks(3, 11)
    model = perturbed_hedgehog(arch)
    logits = model(ids, use_cache=False).logits
    expected = reference_layer_mse(arch, model, ids)
    assert len(expected) == 2 and min(expected) > 0
    assert attention_mse(model, ids, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(model(ids, use_cache=False).logits, logits)  # no hook left behind


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_transfer_loss_is_the_summed_layer_mse_of_the_blocks_taken_in_order(arch):
    ids = token_blocks(5, 13)
    model = perturbed_hedgehog(arch)
    expected = [sum(reference_layer_mse(arch, model, ids[rows])) for rows in ([0, 1], [2, 3], [4, 0])]
    result = attention_transfer(model, ids, steps=3, batch_size=2, lr=1e-9, progress=False)  # lr: weights stay
    assert result.losses == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_reduces_the_mse_and_trains_only_the_new_parameters():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    new = {id(p) for p in linear_attention_parameters(model)}
    data = token_blocks()
    before = attention_mse(model, data)
    result = attention_transfer(model, data, steps=25, batch_size=4, lr=2e-2, progress=False)
    after = attention_mse(model, data)
    assert len(before) == 2 and sum(after) < 0.8 * sum(before)
    assert len(result.losses) == 25 and result.tokens == 25 * 4 * 19
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]) != (id(p) in new), name
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_attention_transfer_needs_parameters_to_train():
    model = linearize(tiny_llama(), LinearizeConfig(feature_map="dijiang_official", decay=False))
    with pytest.raises(ConfigError, match="no linear-attention parameter to train"):
        attention_transfer(model, token_blocks(), steps=1, batch_size=1, lr=1e-3, progress=False)
    with pytest.raises(ConfigError, match="steps=0 is not allowed"):
        attention_transfer(linearize(tiny_llama()), token_blocks(), steps=0, batch_size=1, lr=1e-3)


def test_attention_transfer_logs_checkpoints_and_resumes_exactly(tmp_path):
    def transfer(model: nn.Module, output_dir: Path, **options) -> TrainResult:
        return attention_transfer(
            model,
            token_blocks(),
            steps=4,
            batch_size=3,
            lr=2e-2,
            progress=False,
            output_dir=str(output_dir),
            checkpoint_every=2,
            **options,
        )

    whole = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    result = transfer(whole, tmp_path / "whole")
    lines = [json.loads(line) for line in (tmp_path / "whole" / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and [line["loss"] for line in lines] == result.losses
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(checkpoint_root(tmp_path / "cut") / "step-000004")  # as if killed before step 4's checkpoint
    resumed = linearize(tiny_llama(), LinearizeConfig(feature_map="hedgehog"))
    again = transfer(resumed, tmp_path / "cut", resume=True)
    assert again.start_step == 2 and again.losses == result.losses[2:]
    expected = linear_attention_parameters(whole)
    assert all(torch.equal(p, expected[i]) for i, p in enumerate(linear_attention_parameters(resumed)))
    assert all(p.requires_grad for p in resumed.parameters()) and not resumed.training


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_converted_model_learns_with_an_adapter(arch):
    model = linearize(TINY[arch]())
    data = token_blocks(4, 16)
    before = evaluate_lm(model, data)
    targets = [t for t in LORA_TARGETS if t in PROJECTIONS[arch]]
    model, _ = finetune(
        model, data, steps=30, batch_size=2, lr=1e-2, adapter=st.LoraConfig(r=4, target_modules=targets), progress=False
    )
    assert evaluate_lm(model, data) < before - 0.2
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in linear_attention_parameters(model)} < trainable
    assert st.parameter_counts(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("window", [0, 4], ids=["linear", "window"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip_is_exact(arch, window, tmp_path):
    config = LinearizeConfig(
        feature_map="dijiang", output_gate=True, share_feature_map=False, seed=5, window=window, sink_tokens=window // 2
    )
    model = linearize(TINY[arch](), config)
    with torch.no_grad():
        for i, p in enumerate(linear_attention_parameters(model)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    save_linearized(model, tmp_path)
    loaded = load_linearized(TINY[arch](), tmp_path)
    assert loaded.slimtune_linearize_config == config
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    ids = token_blocks(2, 9)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_refuses_a_mismatch_and_leaves_the_model_unchanged(tmp_path):
    save_linearized(linearize(tiny_llama()), tmp_path)
    other = tiny_gpt2()
    with pytest.raises(AdapterFileError, match=r"do not fit this model; missing: \['transformer.h.0.attn"):
        load_linearized(other, tmp_path)
    assert not list(linear_attention_layers(other)) and not hasattr(other, "slimtune_linearize_config")
    with pytest.raises(AdapterFileError, match=r"linear_attention_config\.json does not exist"):
        load_linearized(tiny_llama(), tmp_path / "missing")
    (tmp_path / "linear_attention.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterFileError, match="cannot read the saved tensors"):
        load_linearized(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="is not linearised"):
        save_linearized(tiny_llama(), tmp_path)


@pytest.mark.slow
def test_smollm2_recovery_improves_perplexity_over_the_untrained_conversion():
    """Real SmolLM2-135M on BBC News: both recovery stages lower held-out perplexity (a few minutes on 2 cores)."""
    from slimtune.app.corpus import lm_blocks
    from slimtune.app.models import load_smollm2

    base, tokenizer = load_smollm2(dtype=torch.float32)
    train = lm_blocks(tokenizer, split="train", seq_len=128, max_blocks=48)
    held_out = lm_blocks(tokenizer, split="validation", seq_len=128, max_blocks=8)
    model = linearize(copy.deepcopy(base), LinearizeConfig())
    assert all(isinstance(m, LinearAttention) for m in (layer.self_attn for layer in model.model.layers))
    untrained = math.exp(evaluate_lm(model, held_out))
    attention_transfer(model, train, steps=12, batch_size=2, lr=5e-2, progress=False)
    transferred = math.exp(evaluate_lm(model, held_out))
    model, _ = finetune(
        model,
        train[24:],
        steps=12,
        batch_size=2,
        lr=1e-3,
        warmup=2,
        adapter=st.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        progress=False,
    )
    finetuned = math.exp(evaluate_lm(model, held_out))
    assert transferred < untrained and finetuned < transferred, (untrained, transferred, finetuned)
