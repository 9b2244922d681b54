"""lm-evaluation-harness on slimtune models: the numbers lm-eval reports against log-likelihoods computed here.

The model is a tiny random Llama with SmolLM2's real tokenizer (vocabulary 49,152) and weights large enough that
its predictions depend on the context, adapted with a LoRA whose factors are random so that the adapter changes
the output. The references run the model directly: one forward
per (context + choice) for ``bbc_topic``, one forward per article (after the tokenizer's BOS token, as the
harness scores a document from its first token) for ``bbc_perplexity``, then the metrics' definitions.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune as st
from cases import randomize_adapters
from slimtune.app.corpus import bbc_news_articles, split_articles
from slimtune.app.harness import TASKS, run_harness, summarize, task_data_folder, write_task_configs
from slimtune.app.models import load_smollm2_tokenizer
from slimtune.errors import ConfigError

LIMIT = 3


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def adapted(tokenizer):
    """A 2-layer Llama over SmolLM2's vocabulary with an unmerged, randomised LoRA on every linear layer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,  # 10x the default: log-probabilities that move by nats when the context does
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = st.get_adapted_model(LlamaForCausalLM(config).eval(), st.LoraConfig(r=4, alpha=8.0))
    randomize_adapters(model, scale=0.5)
    return model


@pytest.fixture(scope="module")
def harness_run(adapted, tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return run_harness(adapted, tokenizer=tokenizer, limit=LIMIT, cache_dir=cache, log_samples=True), cache


def log_likelihood(model, tokenizer, context_ids: list[int], continuation: str) -> float:
    """log p(continuation | context) summed over the continuation's tokens, by one forward of the whole."""
    target = tokenizer(continuation).input_ids
    ids = torch.tensor([context_ids + target])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context_ids) - 1 : -1]  # [len(target), V]
    return logits.log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)].sum().item()


def test_bbc_topic_scores_are_the_log_likelihoods_of_the_topic_names(harness_run, adapted, tokenizer):
    results, _ = harness_run
    test = split_articles(bbc_news_articles())["test"][:LIMIT]
    topics = sorted({a.topic for a in bbc_news_articles()})
    samples = sorted(results["samples"]["bbc_topic"], key=lambda s: s["doc_id"])
    assert len(samples) == LIMIT
    hits, hits_norm = [], []
    for article, sample in zip(test, samples):
        prompt = "Article: " + " ".join(article.text.split()[:64]) + "\nTopic:"
        context = tokenizer(prompt).input_ids
        expected = [log_likelihood(adapted, tokenizer, context, " " + topic) for topic in topics]
        reported = [resp[0][0] for resp in sample["resps"]]
        assert reported == pytest.approx(expected, rel=1e-4, abs=1e-4)
        hits.append(max(range(5), key=lambda i: expected[i]) == article.label)
        hits_norm.append(max(range(5), key=lambda i: expected[i] / len(topics[i])) == article.label)
    summary = summarize(results)["bbc_topic"]
    assert summary["acc"] == pytest.approx(sum(hits) / LIMIT)
    assert summary["acc_norm"] == pytest.approx(sum(hits_norm) / LIMIT)


def test_bbc_perplexity_is_exp_of_the_summed_negative_log_likelihood_per_word_and_byte(harness_run, adapted, tokenizer):
    results, _ = harness_run
    texts = [a.text for a in split_articles(bbc_news_articles())["test"][:LIMIT]]
    nll = 0.0
    for text in texts:
        ids = tokenizer(text).input_ids
        assert len(ids) < 2048  # one window: the whole article is scored in one forward
        nll -= log_likelihood(adapted, tokenizer, [tokenizer.bos_token_id], text)
    words = sum(len(re.split(r"\s+", text)) for text in texts)
    size = sum(len(text.encode("utf-8")) for text in texts)
    summary = summarize(results)["bbc_perplexity"]
    assert summary["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert summary["byte_perplexity"] == pytest.approx(math.exp(nll / size), rel=1e-4)
    assert summary["bits_per_byte"] == pytest.approx(nll / size / math.log(2), rel=1e-4)


def test_a_merged_folder_scores_like_the_adapted_model_in_memory(harness_run, adapted, tokenizer, tmp_path):
    results, cache = harness_run
    folder = tmp_path / "merged"
    st.merge_and_unload(copy.deepcopy(adapted)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from_folder = run_harness(folder, tasks=["bbc_topic"], limit=LIMIT, cache_dir=cache, log_samples=True)
    scores = [[r[0][0] for r in sample["resps"]] for sample in sorted(from_folder["samples"]["bbc_topic"], key=_id)]
    expected = [[r[0][0] for r in sample["resps"]] for sample in sorted(results["samples"]["bbc_topic"], key=_id)]
    assert np.allclose(scores, expected, rtol=1e-4, atol=1e-4)


def _id(sample: dict) -> int:
    return sample["doc_id"]


def test_the_task_data_and_configs_point_at_the_test_split(tmp_path):
    data = task_data_folder(tmp_path, topic_words=5)
    test = split_articles(bbc_news_articles())["test"]
    topic_rows = [json.loads(line) for line in (data / "bbc_topic.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in topic_rows] == [a.label for a in test]
    assert topic_rows[0]["choices"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert topic_rows[0]["text"] == " ".join(test[0].text.split()[:5])
    perplexity_rows = (data / "bbc_perplexity.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in perplexity_rows] == [a.text for a in test]
    configs = tmp_path / "configs"
    configs.mkdir()
    for path in write_task_configs(configs, data):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["task"] in TASKS
        assert config["dataset_kwargs"]["data_files"]["test"] == str(data / f"{config['task']}.jsonl")


def test_bad_arguments_name_the_field(adapted, tmp_path):
    with pytest.raises(ConfigError, match=r"tasks=.*'hellaswag'"):
        run_harness(tmp_path, tasks=["hellaswag"])
    with pytest.raises(ConfigError, match=r"model=LlamaForCausalLM .*tokenizer"):
        run_harness(adapted)
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        run_harness(tmp_path)
    with pytest.raises(ConfigError, match="topic_words=0"):
        task_data_folder(tmp_path, topic_words=0)


def test_a_task_of_ones_own_runs_from_include_path(adapted, tokenizer, tmp_path):
    data = tmp_path / "yes_no.jsonl"
    data.write_text('{"q": "Is the sky blue?", "label": 0}\n{"q": "Is fire cold?", "label": 1}\n')
    (tmp_path / "yes_no.yaml").write_text(
        "task: yes_no\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}} Answer:"\n'
        'doc_to_choice: ["yes", "no"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    results = run_harness(adapted, tasks=["yes_no"], tokenizer=tokenizer, include_path=tmp_path, log_samples=True)
    samples = sorted(results["samples"]["yes_no"], key=_id)
    hits = []
    for question, label, sample in zip(["Is the sky blue?", "Is fire cold?"], [0, 1], samples):
        context = tokenizer(question + " Answer:").input_ids
        expected = [log_likelihood(adapted, tokenizer, context, " " + word) for word in ("yes", "no")]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        hits.append(int(expected[label] > expected[1 - label]))
    assert summarize(results)["yes_no"]["acc"] == pytest.approx(sum(hits) / 2)
