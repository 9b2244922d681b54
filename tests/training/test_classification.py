"""Sequence classification on the one loop: the [n, T, 2] example format, its check, the loss against a per-example
reference without padding, metrics against scikit-learn, k-shot draws, and training / resuming with train()."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

from cases import tiny_bert_classifier, tiny_llama
from slimtune.errors import ConfigError
from slimtune.training import (
    TrainConfig,
    classification_loss,
    encode_classification,
    evaluate_classifier,
    evaluate_loss,
    k_shot,
    loss_weight,
    macro_f1,
    predict,
    train,
)
from slimtune.training.checkpoint import checkpoint_root, latest_checkpoint
from slimtune.training.evaluate import check_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real HF fast tokenizer over WORDS (ids < 64, within the tiny BERT's 101) adding [CLS] ... [SEP]."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


def tiny_bert(seed: int = 0, num_labels: int = 3, init_std: float = 0.02) -> BertForSequenceClassification:
    """A 2-layer BERT classifier in train mode; ``init_std=0.5`` gives logits large enough that attending to padding
    shows."""
    return tiny_bert_classifier(num_labels, seed, init_std).train()


def topic_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of 2..4 words of their class (0..2; class c's words are w{10c} .. w{10c + 9}) and 0..2 noise words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        own = [f"w{10 * label + rng.randrange(10)}" for _ in range(rng.randint(2, 4))]
        picked = own + [f"w{30 + rng.randrange(30)}" for _ in range(rng.randint(0, 2))]
        rng.shuffle(picked)
        texts.append(" ".join(picked))
        labels.append(label)
    return texts, labels


class ListTokenizer:
    """A stand-in tokenizer whose encodings are given, with chosen pad / EOS ids."""

    def __init__(self, encodings: dict[str, list[int]], pad: int | None, eos: int | None) -> None:
        self.encodings, self.pad_token_id, self.eos_token_id = encodings, pad, eos

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encodings[text][:max_length] for text in texts]}


# --- encoding -------------------------------------------------------------------------------------------------------


def test_encode_pads_on_the_right_and_marks_label_plus_one_on_real_tokens(words):
    examples = encode_classification(["w1 w2 w3", "w4"], [2, 0], words, max_len=10)
    cls, sep, pad, w = 2, 3, 0, lambda i: 4 + i
    assert examples.dtype == torch.long and examples.shape == (2, 5, 2)
    assert examples[..., 0].tolist() == [[cls, w(1), w(2), w(3), sep], [cls, w(4), sep, pad, pad]]
    assert examples[..., 1].tolist() == [[3, 3, 3, 3, 3], [1, 1, 1, 0, 0]]
    assert (examples[:, 0, 1] - 1).tolist() == [2, 0]


def test_encode_truncates_to_max_len_keeping_the_special_tokens(words):
    examples = encode_classification(["w1 w2 w3 w4", "w5"], [1, 1], words, max_len=3)
    assert examples[..., 0].tolist() == [[2, 5, 3], [2, 9, 3]]
    assert examples[..., 1].tolist() == [[2, 2, 2], [2, 2, 2]]
    assert encode_classification(["w1 w2 w3 w4"], [0], words, max_len=1).tolist() == [[[2, 1]]]


def test_encode_pads_with_the_pad_else_the_eos_else_id_0():
    encodings = {"a": [7, 8, 9], "b": [5]}
    for pad, eos, expected in ((4, 6, 4), (None, 6, 6), (None, None, 0)):
        examples = encode_classification(["a", "b"], [0, 1], ListTokenizer(encodings, pad, eos))
        assert examples[1, :, 0].tolist() == [5, expected, expected]


def test_encode_with_the_minilm_tokenizer():
    from slimtune.app.models import load_minilm

    _, tokenizer = load_minilm()
    long_text = " ".join(["the markets rallied again today"] * 40)
    examples = encode_classification(["Shares rose.", long_text], [1, 4], tokenizer, max_len=32)
    assert examples.shape == (2, 32, 2)
    ids, marks = examples.unbind(-1)
    assert marks[1].tolist() == [5] * 32 and ids[1, 0] == 101 and ids[1, -1] == 102  # [CLS] ... [SEP], cut
    real = int((marks[0] > 0).sum())
    assert ids[0, 0] == 101 and ids[0, real - 1] == 102 and real == 5  # [CLS] shares rose . [SEP]
    assert ids[0, real:].eq(tokenizer.pad_token_id).all() and marks[0, real:].eq(0).all()


@pytest.mark.parametrize(
    ("texts", "labels", "max_len", "message"),
    [
        (["w1", "w2"], [0], 8, "got 2 texts and 1 labels"),
        ([], [], 8, "got no texts"),
        (["w1", "w2"], [0, -1], 8, r"labels\[1\]=-1 is not allowed: expected an integer >= 0"),
        (["w1"], ["0"], 8, r"labels\[0\]='0' is not allowed"),
        (["w1"], [True], 8, r"labels\[0\]=True is not allowed"),
        (["w1"], [1.0], 8, r"labels\[0\]=1.0 is not allowed"),
        (["w1", " "], [0, 1], 8, r"texts\[1\]=' ' is not allowed: expected a non-empty string"),
        (["w1"], [0], 0, "max_len=0 is not allowed: expected a positive integer"),
    ],
)
def test_encode_refuses_bad_inputs(words, texts, labels, max_len, message):
    with pytest.raises(ConfigError, match=message):
        encode_classification(texts, labels, words, max_len=max_len)


def test_encode_refuses_a_text_without_tokens():
    with pytest.raises(ConfigError, match=r"texts\[1\]='b' gives no token"):
        encode_classification(["a", "b"], [0, 1], ListTokenizer({"a": [3], "b": []}, 0, None))


# --- the check of the loop ------------------------------------------------------------------------------------------


def test_check_blocks_accepts_classification_examples_and_names_what_is_wrong(words):
    model = tiny_bert()
    good = encode_classification(["w1 w2 w3", "w4", "w5 w6"], [2, 0, 1], words)  # T = 5
    check_blocks("examples", good, model)
    check_blocks("examples", good[:, :1], model)  # one token is enough

    def broken(example: int, position: int, channel: int, value: int) -> torch.Tensor:
        bad = good.clone()
        bad[example, position, channel] = value
        return bad

    cases = [
        (good[:, :0], r"examples has seq_len=0: .*classification examples \[n_examples, seq_len, 2\]"),
        (good.float(), r"dtype torch.float32: .*or classification examples \[n_examples, seq_len, 2\]"),
        (broken(1, 2, 0, 101), r"examples holds input ids 0 \.\. 101: allowed are 0 \.\. 100"),
        (broken(2, 3, 1, -100), r"examples\[2, 3\] holds -100 in channel 1 of classification examples of shape"),
        (broken(1, 0, 1, 0), r"examples\[1\] starts with padding \(channel 1 is 0 at token 0\)"),
        (broken(0, 3, 1, 2), r"examples\[0, 3\] has label \+ 1 = 2 in channel 1 but token 0 of the example has 3"),
        (broken(1, 4, 1, 1), r"examples\[1, 4\] is attended \(channel 1 is 1\) after padding at token 3"),
    ]
    for examples, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_blocks("examples", examples, model)
    with pytest.raises(ConfigError, match=r"blocks has seq_len=1: .*\(a next-token loss needs two tokens\)"):
        check_blocks("blocks", good[:, :1, 0], tiny_llama())


# --- loss, predictions and metrics against references ---------------------------------------------------------------


def reference_logits(model: torch.nn.Module, examples: torch.Tensor) -> torch.Tensor:
    """Logits [n, C] of each example run alone, cut to its real tokens: no padding, no attention mask."""
    rows = []
    with torch.no_grad():
        for example in examples:
            ids = example[example[:, 1] > 0, 0]  # [L]
            rows.append(model(input_ids=ids[None]).logits[0])
    return torch.stack(rows)


def test_the_loss_is_the_cross_entropy_of_each_example_alone(words):
    model = tiny_bert(init_std=0.5).eval()
    texts, labels = topic_texts(7, seed=1)
    examples = encode_classification(texts, labels, words)
    logits = reference_logits(model, examples)
    by_hand = -torch.stack([logits[i].log_softmax(-1)[label] for i, label in enumerate(labels)]).mean()
    torch.testing.assert_close(classification_loss(model, examples), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        evaluate_loss(model, examples, classification_loss, batch_size=3), by_hand.item(), rtol=1e-5, atol=1e-6
    )
    assert loss_weight(classification_loss, examples[:4]) == 4
    assert predict(model, examples, batch_size=2).tolist() == logits.argmax(-1).tolist()


def test_the_loss_refuses_other_batches_models_and_labels(words):
    examples = encode_classification(["w1 w2", "w3"], [0, 2], words)
    with pytest.raises(ConfigError, match=r"batch of shape \(2, 4\): expected classification examples \[B, T, 2\]"):
        classification_loss(tiny_bert(), examples[..., 0])
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM gave logits of shape \(2, 4, 101\) .*ForSequenceClass"):
        classification_loss(tiny_llama(), examples)
    with pytest.raises(ConfigError, match=r"label 2 but BertForSequenceClassification has C=2 classes: .* 0 \.\. 1"):
        classification_loss(tiny_bert(num_labels=2), examples)


def test_predict_and_evaluate_run_in_eval_mode_and_restore_the_mode(words):
    model = tiny_bert(init_std=0.5).train()
    texts, labels = topic_texts(11, seed=2)
    examples = encode_classification(texts, labels, words)
    expected = reference_logits(model.eval(), examples).argmax(-1)
    model.train()
    assert torch.equal(predict(model, examples, batch_size=4), expected) and model.training
    evaluate_classifier(model, examples, 3)
    assert model.training


def test_metrics_match_scikit_learn(words):
    model = tiny_bert(seed=3, init_std=0.5)
    texts, labels = topic_texts(20, seed=3)
    examples = encode_classification(texts, labels, words)
    metrics = evaluate_classifier(model, examples, num_labels=3, batch_size=6)
    logits = reference_logits(model.eval(), examples)
    predicted = logits.argmax(-1).tolist()
    assert metrics.n == 20
    assert metrics.confusion == confusion_matrix(labels, predicted, labels=[0, 1, 2]).tolist()
    assert metrics.accuracy == pytest.approx(accuracy_score(labels, predicted))
    assert metrics.macro_f1 == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0))
    by_hand = -sum(logits[i].log_softmax(-1)[label].item() for i, label in enumerate(labels)) / 20
    assert metrics.loss == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(ConfigError, match="num_labels=4 but BertForSequenceClassification has 3 classes"):
        evaluate_classifier(model, examples, num_labels=4)


def test_macro_f1_leaves_out_absent_classes_and_scores_unpredicted_ones_0():
    # class 0: TP 2, FN 1, FP 1 -> 4/6; class 1: no true, no predicted example -> left out; class 2: TP 3, FN 1, FP 1
    assert macro_f1([[2, 0, 1], [0, 0, 0], [1, 0, 3]]) == pytest.approx((4 / 6 + 6 / 8) / 2)
    assert macro_f1([[2, 0], [3, 0]]) == pytest.approx((4 / 7 + 0) / 2)  # class 1 true but never predicted
    rng = random.Random(0)
    for _ in range(20):
        true = [rng.choice([0, 1, 3, 4]) for _ in range(15)]
        guess = [rng.choice([0, 1, 2, 4]) for _ in range(15)]
        table = [[sum(1 for t, g in zip(true, guess) if (t, g) == (a, b)) for b in range(5)] for a in range(5)]
        assert macro_f1(table) == pytest.approx(f1_score(true, guess, average="macro", zero_division=0))


# --- k-shot ---------------------------------------------------------------------------------------------------------


def test_k_shot_draws_k_of_every_class_the_same_for_a_seed():
    labels = [i % 4 for i in range(40)] + [1] * 5
    chosen = k_shot(labels, k=3, seed=7)
    assert chosen == sorted(set(chosen)) and len(chosen) == 12
    assert sorted(labels[i] for i in chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert k_shot(labels, k=3, seed=7) == chosen
    assert len({tuple(k_shot(labels, k=3, seed=seed)) for seed in range(6)}) > 3  # another seed, another draw
    every = k_shot(labels, k=10, seed=0)  # classes 0, 2, 3 have 10 examples: all are drawn; class 1 has 15
    assert [i for i in every if labels[i] != 1] == [i for i in range(40) if labels[i] != 1]
    assert sum(labels[i] == 1 for i in every) == 10


@pytest.mark.parametrize(
    ("labels", "k", "message"),
    [
        ([0, 0, 0, 1, 1, 2, 2, 2], 3, "class 1 has 2 examples, fewer than k=3"),
        ([0, 0, 2, 2], 1, r"class 1 has 0 examples \(an empty class\): expected k=1 examples of every class 0 \.\. 2"),
        ([0, 1], 0, "k=0 is not allowed"),
        ([0, -1], 1, r"labels\[1\]=-1 is not allowed"),
        ([], 1, "got no labels"),
    ],
)
def test_k_shot_refuses(labels, k, message):
    with pytest.raises(ConfigError, match=message):
        k_shot(labels, k, seed=0)


# --- the one loop ---------------------------------------------------------------------------------------------------


def test_train_with_the_classification_loss_learns_the_topics(words):
    train_examples = encode_classification(*topic_texts(48, seed=4), words)
    held_out = encode_classification(*topic_texts(24, seed=5), words)
    model = tiny_bert(seed=4)
    before = evaluate_classifier(model, held_out, 3)
    config = TrainConfig(steps=80, batch_size=8, lr=1e-2, progress=False, eval_every=40)
    result = train(model, train_examples, config, held_out, loss_fn=classification_loss)
    after = evaluate_classifier(model, held_out, 3)
    assert before.accuracy < 0.5 and after.accuracy > 0.8 and after.loss < before.loss - 0.5
    assert sorted(result.eval_losses) == [40, 80] and result.eval_losses[80] == pytest.approx(after.loss, rel=1e-5)


def test_a_resumed_classification_run_ends_with_the_uninterrupted_weights(tmp_path, words):
    examples = encode_classification(*topic_texts(20, seed=6), words)
    starts = []

    def run(folder, stop_after: int | None = None, resume: bool = False) -> dict[str, torch.Tensor]:
        model = tiny_bert(seed=6)  # dropout 0.1 and shuffled data: the restored RNG state and position matter
        settings = {"steps": 6, "batch_size": 4, "lr": 1e-3, "seed": 3, "progress": False, "checkpoint_every": 2}
        config = TrainConfig(**settings, output_dir=str(folder), resume=resume)

        def stop(record: dict) -> None:
            if record["step"] == stop_after:
                raise KeyboardInterrupt

        with contextlib.suppress(KeyboardInterrupt):
            starts.append(train(model, examples, config, on_step=stop, loss_fn=classification_loss).start_step)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    initial = dict(tiny_bert(seed=6).named_parameters())
    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=4)
    assert latest_checkpoint(checkpoint_root(tmp_path / "cut")).name == "step-000004"
    resumed = run(tmp_path / "cut", resume=True)
    assert starts == [0, 4]
    assert all(torch.equal(resumed[name], tensor) for name, tensor in whole.items())
    assert sum(not torch.equal(initial[name], tensor) for name, tensor in whole.items()) > len(whole) // 2
