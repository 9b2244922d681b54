"""``modules_to_save``: whole modules trained as copies beside an adapter, saved, loaded, merged, exported, tied.

The models are tiny sequence classifiers (BERT and Llama, as transformers builds them from a config) and a tiny
Llama causal LM with tied embeddings. References: the base model with its head's weights replaced by hand, and
PEFT's own ``modules_to_save`` given the same weights.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import slimtune as st
from cases import assert_unchanged, randomize_adapters, snapshot, tiny_bert_classifier
from slimtune.adapters.saved_modules import SavedModule

TOL = {"rtol": 1e-5, "atol": 1e-5}


def small_llama(head: str, seed: int = 0, **settings: object) -> nn.Module:
    """``Llama<head>`` ("ForSequenceClassification", "ForCausalLM"): hidden 24, 1 layer, 2 heads, vocabulary 101."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=24, intermediate_size=36, num_hidden_layers=1, num_attention_heads=2, **settings
    )
    return getattr(transformers, f"Llama{head}")(config).eval()


def tiny_llama_classifier(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """LlamaForSequenceClassification with pad id 0; head ``score``."""
    return small_llama("ForSequenceClassification", seed, num_labels=num_labels, pad_token_id=0)


def tied_llama(seed: int = 0) -> nn.Module:
    """LlamaForCausalLM with ``lm_head.weight is model.embed_tokens.weight``."""
    return small_llama("ForCausalLM", seed, tie_word_embeddings=True)


CLASSIFIERS = {
    "bert": (tiny_bert_classifier, "classifier"),
    "llama": (tiny_llama_classifier, "score"),
}
METHODS = {
    "lora": st.LoraConfig(r=2),
    "bone": st.DishaConfig(r=4),
    "surm_circulant": st.SurmConfig(structure="circulant"),
}
INPUT = torch.tensor([[5, 17, 33, 2, 9, 41, 7], [3, 88, 12, 60, 1, 1, 1]])


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=INPUT, attention_mask=(INPUT != 1).long()).logits


def trained(model: nn.Module, head: str, seed: int = 3) -> nn.Module:
    """Random adapter values and a random head copy (as after training)."""
    randomize_adapters(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.get_submodule(head).modules_to_save["default"].parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def with_head(base: nn.Module, head: str, trained_head: nn.Module) -> nn.Module:
    """The reference: ``base`` with its head's tensors replaced by ``trained_head``'s."""
    model = copy.deepcopy(base)
    model.get_submodule(head).load_state_dict(trained_head.state_dict())
    return model


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_the_head_copy_trains_and_runs_while_the_original_stays_frozen(kind):
    make, head = CLASSIFIERS[kind]
    base = make()
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=2, modules_to_save=[head]))
    wrapper = model.get_submodule(head)
    assert isinstance(wrapper, SavedModule)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)  # the copy starts equal, B = 0
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert head not in {name.split(".")[0] for name, _ in st.adapted_layers(model)}  # all-linear skips the head
    logits(model).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.modules_to_save["default"].parameters())
    assert all(p.grad is None for p in wrapper.original_module.parameters())
    head_size = sum(p.numel() for p in base.get_submodule(head).parameters())
    same_layers = st.LoraConfig(r=2, target_modules=[name for name, _ in st.adapted_layers(model)])
    lora_only = st.parameter_counts(st.get_adapted_model(copy.deepcopy(base), same_layers))
    assert st.parameter_counts(model).trainable == lora_only.trainable + head_size


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_the_forward_is_the_base_model_with_the_trained_head_when_adapters_are_disabled_and_enabled(kind):
    make, head = CLASSIFIERS[kind]
    base = make()
    model = st.get_adapted_model(
        copy.deepcopy(base),
        st.LoraConfig(r=2, target_modules=["query"] if kind == "bert" else ["q_proj"], modules_to_save=[head]),
    )
    with torch.no_grad():
        for param in model.get_submodule(head).modules_to_save["default"].parameters():
            param.add_(0.5)
    reference = with_head(base, head, model.get_submodule(head).modules_to_save["default"])
    torch.testing.assert_close(logits(model), logits(reference), **TOL)  # LoRA's B = 0: only the head differs
    with st.disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    assert model.get_submodule(head).weight is model.get_submodule(head).modules_to_save["default"].weight


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_save_load_merge_export_round_trips_reproduce_the_logits(kind, method, tmp_path):
    make, head = CLASSIFIERS[kind]
    base = make()
    config = copy.deepcopy(METHODS[method])
    config.modules_to_save = [head]
    model = trained(st.get_adapted_model(copy.deepcopy(base), config), head)
    expected = logits(model)
    st.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == [head] and saved["config"]["modules_to_save"] == [head]
    keys = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k for k in keys if k.startswith(f"{head}.")} == {
        f"{head}.{k}" for k in base.get_submodule(head).state_dict()
    }
    loaded = st.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, **TOL)
    merged = st.merge_and_unload(loaded)
    assert not any(isinstance(m, SavedModule) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, **TOL)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(base).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, **TOL)
    if method != "bone":  # PEFT MiSS has no sequence-classification parity test here; LoRA and C3A do
        st.export_peft(model, tmp_path / "peft")
        written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert written["modules_to_save"] == [head]
        torch.testing.assert_close(
            logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")), expected, **TOL
        )
        torch.testing.assert_close(logits(st.import_peft(copy.deepcopy(base), tmp_path / "peft")), expected, **TOL)


def test_unload_gives_back_the_original_head():
    base = tiny_bert_classifier()
    model = trained(
        st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=2, modules_to_save=["classifier"])), "classifier"
    )
    plain = st.unload(model)
    assert isinstance(plain.classifier, nn.Linear)
    torch.testing.assert_close(logits(plain), logits(base), rtol=0, atol=0)


def test_peft_with_the_same_weights_gives_the_same_outputs_and_head_gradients():
    base = tiny_bert_classifier()
    ours = trained(
        st.get_adapted_model(
            copy.deepcopy(base),
            st.LoraConfig(r=2, alpha=4.0, target_modules=["query", "value"], modules_to_save=["classifier"]),
        ),
        "classifier",
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    with torch.no_grad():
        for name, layer in st.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.adapter("default").lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.adapter("default").lora_B)
        theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(
            ours.classifier.modules_to_save["default"].state_dict()
        )
    torch.testing.assert_close(logits(theirs), logits(ours), **TOL)
    logits(ours).square().sum().backward()
    logits(theirs).square().sum().backward()
    ours_head = ours.classifier.modules_to_save["default"]
    theirs_head = theirs.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(theirs_head.weight.grad, ours_head.weight.grad, **TOL)
    torch.testing.assert_close(theirs_head.bias.grad, ours_head.bias.grad, **TOL)


def test_a_tied_module_keeps_its_tie_is_saved_once_and_merges_tied(tmp_path):
    base = tied_llama()
    model = st.get_adapted_model(
        copy.deepcopy(base), st.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    head, embeddings = model.lm_head, model.model.embed_tokens
    assert isinstance(head, SavedModule) and isinstance(embeddings, SavedModule)
    assert head.modules_to_save["default"].weight is embeddings.modules_to_save["default"].weight
    assert head.original_module.weight is embeddings.original_module.weight
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.25)
    expected = model(input_ids=INPUT).logits
    manual = copy.deepcopy(base)
    with torch.no_grad():
        manual.lm_head.weight.add_(0.25)  # the tie moves the input embeddings too
    torch.testing.assert_close(expected, manual(input_ids=INPUT).logits, **TOL)
    with st.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=INPUT).logits, base(input_ids=INPUT).logits, rtol=0, atol=0)
    st.save_adapter(model, tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert [k for k in saved if "q_proj" not in k] == ["lm_head.weight"]
    loaded = st.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=INPUT).logits, expected, **TOL)
    merged = st.merge_and_unload(loaded)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged(input_ids=INPUT).logits, expected, **TOL)


def test_two_adapters_have_their_own_heads_and_deleting_one_puts_the_original_back():
    base = tiny_bert_classifier()
    model = st.get_adapted_model(copy.deepcopy(base), st.LoraConfig(r=2, modules_to_save=["classifier"]), "first")
    st.get_adapted_model(model, st.LoraConfig(r=2, modules_to_save=["classifier"]), "second")
    first, second = (model.classifier.modules_to_save[name] for name in ("first", "second"))
    with torch.no_grad():
        first.bias.fill_(1.0)
        second.bias.fill_(-1.0)
    assert model.classifier.active_copy == "second" and not first.bias.requires_grad and second.bias.requires_grad
    st.set_adapter(model, "first")
    assert model.classifier.in_use() is first and first.bias.requires_grad and not second.bias.requires_grad
    st.delete_adapter(model, "first")
    assert model.classifier.active_copy is None
    st.delete_adapter(model, "second")
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


def test_a_head_for_another_number_of_labels_is_refused_naming_both(tmp_path):
    model = st.get_adapted_model(tiny_bert_classifier(3), st.LoraConfig(r=2, modules_to_save=["classifier"]))
    st.save_adapter(model, tmp_path)
    other = tiny_bert_classifier(5)
    before = snapshot(other)
    with pytest.raises(
        st.AdapterFileError, match="saved for 3 labels and this model has 5; load the model with num_labels=3"
    ):
        st.load_adapter(other, tmp_path)
    assert_unchanged(other, before)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (
            lambda: st.LoraConfig(modules_to_save=["clasifier"]),
            st.TargetModulesError,
            r"'clasifier' matches no module of BertForSequenceClassification; .* top-level modules "
            r"\['bert', 'dropout', 'classifier'\]",
        ),
        (
            lambda: st.LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]),
            st.TargetModulesError,
            "target_modules=\\['classifier'\\] names module 'classifier', which modules_to_save copies whole",
        ),
    ],
)
def test_bad_modules_to_save_are_refused_and_leave_the_model_unchanged(config, error, match):
    model = tiny_bert_classifier()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        st.get_adapted_model(model, config())
    assert_unchanged(model, before)


@pytest.mark.parametrize("value", [[], "classifier", [""], [3]])
def test_modules_to_save_values_are_checked(value):
    with pytest.raises(st.ConfigError, match=r"modules_to_save=.* is not allowed: expected None or a non-empty list"):
        st.LoraConfig(modules_to_save=value)


def test_an_adapter_saved_with_a_head_refuses_a_model_without_it(tmp_path):
    model = st.get_adapted_model(
        tiny_bert_classifier(), st.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    st.save_adapter(model, tmp_path)
    bare = transformers.BertModel(tiny_bert_classifier().config)
    with pytest.raises(st.AdapterFileError, match="lacks"):
        st.load_adapter(bare, tmp_path)


def test_a_conversion_to_lora_keeps_the_head_copy(tmp_path):
    base = tiny_bert_classifier()
    model = trained(
        st.get_adapted_model(copy.deepcopy(base), st.SurmConfig(modules_to_save=["classifier"])), "classifier"
    )
    expected = logits(model)
    st.convert_to_lora(model)
    assert st.adapter_configs(model)["default"].modules_to_save == ["classifier"]
    torch.testing.assert_close(logits(model), expected, **TOL)
    st.save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(st.load_adapter(copy.deepcopy(base), tmp_path)), expected, **TOL)
