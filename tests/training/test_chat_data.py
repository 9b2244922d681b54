"""Chat / instruction data: answer-only labels, packing that never leaks between examples, the masked loss.

References are computed apart from the code under test: answer strings written out from the messages, token ids
of each example run alone through the model, cross-entropies by explicit log-softmax over the answer positions.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import slimtune as st
from cases import tiny_llama
from slimtune.errors import ConfigError, DataError
from slimtune.training import TrainConfig, evaluate_loss, train
from slimtune.training.chat_data import (
    chat_blocks,
    chat_format,
    encode_examples,
    packing_leak,
    read_chat_jsonl,
    write_chat_jsonl,
)
from slimtune.training.data import Example, pack_examples
from slimtune.training.evaluate import check_blocks
from slimtune.training.losses import answer_token_count, causal_lm_loss, loss_weight, masked_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "abcdefghijklmnopqrstuvwxyz0123456789"


def word_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A real HF fast tokenizer (ids < 50, within the tiny llama's 101) over letters and digits, ChatML template."""
    specials = ["<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate([*specials, "system", "user", "assistant", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from slimtune.app.models import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


def reversal_chats(n: int, seed: int = 0) -> list[dict]:
    """Conversations whose answers reverse the user's letters; every third has a system turn and two rounds."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        messages = [{"role": "system", "content": "r e v"}] if i % 3 == 0 else []
        for _ in range(2 if i % 3 == 0 else 1):
            letters = rng.choices(WORDS[:26], k=rng.randint(2, 6))
            messages.append({"role": "user", "content": " ".join(letters)})
            messages.append({"role": "assistant", "content": " ".join(reversed(letters))})
        chats.append({"messages": messages})
    return chats


def write_lines(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


# --- answer-only labels -------------------------------------------------------------------------------------------


def test_assistant_turns_are_the_labels_with_the_real_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Deep green, like moss."},
    ]
    (example,) = encode_examples([{"messages": messages}], tok)
    assert list(example.input_ids) == tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        assert label in (-100, token)
        if label != -100:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    assert [tok.decode(run) for run in runs] == ["Blue.<|im_end|>\n", "Deep green, like moss.<|im_end|>\n"]
    first = example.labels.index(next(label for label in example.labels if label != -100))
    assert tok.decode(example.input_ids[:first]).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_completion_labels_the_completion_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (example,) = encode_examples([{"prompt": "Q: capital of France?\nA:", "completion": " Paris"}], tok)
    prompt, completion = tok("Q: capital of France?\nA:")["input_ids"], tok(" Paris")["input_ids"]
    assert list(example.input_ids) == [*prompt, *completion, tok.eos_token_id]
    assert list(example.labels) == [-100] * len(prompt) + [*completion, tok.eos_token_id]


def test_a_template_that_is_not_prefix_stable_is_refused():
    counting = word_tokenizer("{{ messages | length }} " + CHATML)  # the first token changes with every turn
    with pytest.raises(DataError, match=r"example 0: the chat template is not prefix-stable.*messages\[2\]"):
        encode_examples(reversal_chats(1, seed=1), counting)


def test_read_write_round_trip_and_format_detection(tmp_path, words):
    chats = reversal_chats(5)
    path = write_chat_jsonl(chats, tmp_path / "chat.jsonl")
    assert read_chat_jsonl(path) == chats and chat_format(path) == "messages"
    pairs = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "a b", "completion": "c", "id": 3}])
    assert chat_format(pairs) == "prompt_completion"
    assert chat_format(write_lines(tmp_path / "text.jsonl", [{"text": "a b"}])) is None
    assert chat_format(write_lines(tmp_path / "chat.txt", ["a b"])) is None
    assert torch.equal(chat_blocks(path, words, 40), chat_blocks(chats, words, 40))


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
BAD_LINES = {
    "not an object": ([["a", "b"]], r"line 1: got a JSON list; expected an object with 'messages'"),
    "invalid JSON": (["{'prompt': 1}"], r"line 1: invalid JSON"),
    "neither format": ([{"text": "a"}], r"line 1: got an object with keys \['text'\]"),
    "missing completion": ([{"prompt": "a"}], r"line 1: missing field 'completion'"),
    "both formats": ([{**GOOD, "prompt": "a"}], r"both 'messages' and 'prompt'"),
    "empty prompt": ([{"prompt": " ", "completion": "b"}], r"line 1: 'prompt' is ' '; expected a non-empty string"),
    "wrong role": (
        [{"messages": [{"role": "bot", "content": "a"}]}],
        r"messages\[0\] has role='bot'; allowed are \['system', 'user', 'assistant'\]",
    ),
    "empty content": (
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
        r"messages\[1\] content is ''; expected a non-empty string",
    ),
    "content not a string": (
        [{"messages": [{"role": "user", "content": ["a"]}]}],
        r"messages\[0\] content is a JSON list",
    ),
    "no assistant turn": ([{"messages": [{"role": "user", "content": "a"}]}], r"no assistant turn \(roles \['user'\]"),
    "opens with the assistant": (
        [{"messages": [{"role": "assistant", "content": "a"}]}],
        r"opens with an assistant turn",
    ),
    "empty messages": ([{"messages": []}], r"'messages' is \[\]; expected a non-empty list"),
    "mixed formats": (
        [GOOD, "", {"prompt": "a", "completion": "b"}],
        r"line 3: a 'prompt_completion' example, but .*line 1 is a 'messages' one; expected one format per file",
    ),
    "no examples": (["", " "], r"no examples"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_examples_name_the_line_and_field(tmp_path, words, case):
    lines, message = BAD_LINES[case]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_chat_jsonl(path)
    with pytest.raises(DataError, match=message):
        chat_blocks(path, words, 32)


def test_messages_need_a_chat_template(words):
    with pytest.raises(DataError, match="no chat_template"):
        encode_examples([GOOD], word_tokenizer(template=None))


def test_too_long_examples_error_by_default_or_are_dropped_or_truncated(words, caplog):
    chats = reversal_chats(12)
    lengths = [len(example) for example in encode_examples(chats, words)]
    seq_len = sorted(lengths)[-3]  # the two longest examples do not fit
    longer = [length for length in lengths if length > seq_len]
    with pytest.raises(
        DataError,
        match=rf"{len(longer)} of 12 examples are longer than seq_len={seq_len} tokens "
        rf"\(the longest, records, example \d+, has {max(lengths)}\).*too_long='drop'",
    ):
        chat_blocks(chats, words, seq_len)
    dropped = chat_blocks(chats, words, seq_len, too_long="drop")
    assert (dropped[..., 1] != -100).sum() < (chat_blocks(chats, words, max(lengths))[..., 1] != -100).sum()
    assert "dropped" in caplog.text
    truncated = chat_blocks(chats, words, seq_len, too_long="truncate")
    assert (dropped[..., 0] != words.eos_token_id).sum() < (truncated[..., 0] != words.eos_token_id).sum()
    with pytest.raises(ConfigError, match="too_long='cut' is not allowed"):
        chat_blocks(chats, words, seq_len, too_long="cut")


# --- packing ------------------------------------------------------------------------------------------------------


def test_packing_layout_best_fit_padding_and_positions():
    a = Example((11, 12, 13), (-100, 12, 13))
    b = Example((21, 22, 23, 24, 25), (-100, -100, 23, 24, 25))
    c = Example((31, 32), (31, 32))  # a label on the first token is dropped: nothing of its example precedes it
    d = Example((41, 42, 43), (-100, -100, 43))
    blocks = pack_examples([a, b, c, d], seq_len=7, pad_id=0)  # c fits both blocks: it goes where least room is
    assert blocks.shape == (2, 7, 3) and blocks.dtype == torch.long
    ids, labels, positions = blocks.unbind(-1)
    assert ids.tolist() == [[11, 12, 13, 41, 42, 43, 0], [21, 22, 23, 24, 25, 31, 32]]
    assert labels.tolist() == [[-100, 12, 13, -100, -100, 43, -100], [-100, -100, 23, 24, 25, -100, 32]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1]]
    assert torch.equal(pack_examples([a, b, c, d], 7, 0, max_blocks=1), blocks[:1])
    assert answer_token_count(blocks) == 7 and loss_weight(masked_lm_loss, blocks) == 7
    assert loss_weight(causal_lm_loss, ids) == 2


def test_check_blocks_accepts_packed_examples_and_names_what_is_wrong(words):
    model = tiny_llama()
    good = chat_blocks(reversal_chats(6), words, 40)
    check_blocks("blocks", good, model)

    def broken(channel: int, block: int, position: int, value: int) -> torch.Tensor:
        bad = good.clone()
        bad[block, position, channel] = value
        return bad

    answer = (good[0, :, 1] != -100).nonzero()[0].item()
    cases = [
        (good[..., :2], r"shape \(\d+, 40, 2\)"),
        (good.float(), "dtype torch.float32"),
        (broken(0, 0, 3, 101), r"input ids 0 \.\. 101: allowed are 0 \.\. 100"),
        (broken(1, 0, answer, good[0, answer + 1, 0].item() + 1), rf"blocks\[0, {answer}\] has label .* not shifted"),
        (broken(2, 1, 4, 9), r"blocks\[1\] has position ids .*expected 0 at the start"),
        (broken(1, 0, 0, good[0, 0, 0].item()), r"blocks\[0, 0\] starts a sequence .* expected -100"),
        (torch.cat([good, good[:1].clone().index_fill_(2, torch.tensor([1]), -100)]), r"blocks\[\d+\] has no label"),
    ]
    for blocks, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_blocks("blocks", blocks, model)


def test_losses_refuse_the_other_layout(words):
    blocks = chat_blocks(reversal_chats(3), words, 40)
    with pytest.raises(ConfigError, match="loss_fn=masked_lm_loss"):
        causal_lm_loss(tiny_llama(), blocks)
    with pytest.raises(ConfigError, match=r"expected packed examples \[B, T, 3\]"):
        masked_lm_loss(tiny_llama(), blocks[..., 0])


# --- no leak between packed examples, exact answer-token loss -------------------------------------------------------


def logits_in_packed_blocks(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """The logits [n, T, V] the model produced inside :func:`masked_lm_loss` (captured by a forward hook)."""
    captured = []
    handle = model.register_forward_hook(lambda module, args, output: captured.append(output.logits))
    with torch.no_grad():
        masked_lm_loss(model, blocks)
    handle.remove()
    return captured[0]


def segments(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of position ids 0, 1, 2, ... in a block."""
    starts = [t for t, p in enumerate(positions) if p == 0]
    return list(zip(starts, [*starts[1:], len(positions)]))


def worst_leak(model: torch.nn.Module, blocks: torch.Tensor, pad_id: int | None = None) -> float:
    """The largest |logit| difference between each packed example and the same tokens run without packing.

    With ``pad_id``, the reference is a plain causal run of the example followed by padding to the block's length:
    the same kernel shapes, so the same float32 rounding, and any difference is what packing changes. Without,
    it is the example run alone: a shorter sequence, whose rounding differs at ~1e-6 of the logits' size.
    """
    packed = logits_in_packed_blocks(model, blocks)
    worst = 0.0
    with torch.no_grad():
        for b, block in enumerate(blocks):
            examples = [(s, e) for s, e in segments(block[:, 2].tolist()) if (block[s:e, 1] != -100).any()]
            inputs = [block[s:e, 0] for s, e in examples]
            if pad_id is not None:
                inputs = [torch.cat([t, torch.full((blocks.shape[1] - len(t),), pad_id)]) for t in inputs]
            references = [model(input_ids=tokens[None]).logits[0] for tokens in inputs]
            for (start, end), reference in zip(examples, references):
                worst = max(worst, (packed[b, start:end] - reference[: end - start]).abs().max().item())
    return worst


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_see_only_themselves_on_a_tiny_llama(words, attention):
    model = tiny_llama()
    model.config._attn_implementation = attention
    blocks = chat_blocks(reversal_chats(10), words, 48)
    assert (blocks[:, :, 2] == 0).sum(1).max() >= 3  # a block holds two examples or more, and padding
    assert worst_leak(model, blocks, words.eos_token_id) <= 1e-5 and worst_leak(model, blocks) <= 1e-5
    with torch.no_grad():  # the control: a cache (use_cache=True, the config's default) turns the isolation off
        leaky = model(input_ids=blocks[:, :, 0], position_ids=blocks[:, :, 2]).logits
    assert (leaky - logits_in_packed_blocks(model, blocks)).abs().max() > 1e-3


def test_packed_examples_see_only_themselves_in_smollm2():
    from slimtune.app.models import load_smollm2

    # float64 (the stored float16 weights, exactly): rounding is ~1e-13, so any difference left is a leak. In
    # float32, 30 layers round a 100-token sequence differently from a 40-token one by up to 7e-5 (logits up to
    # 43), packed or not (test_smollm2_packing_on_bbc_instructions_in_float32, slow, measures it).
    model, tokenizer = load_smollm2(torch.float64)
    assert model.config._attn_implementation == "sdpa"  # the bundled model's default attention
    chats = [
        [("user", "Capital of Italy?"), ("assistant", "Rome.")],
        [("system", "Be brief."), ("user", "2 + 3?"), ("assistant", "5")],
    ]
    records = [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats]
    blocks = chat_blocks(records, tokenizer, 64)
    assert blocks.shape[0] == 1 and (blocks[0, :, 2] == 0).sum() == 3  # two examples and the padding
    assert worst_leak(model, blocks) <= 1e-9  # measured: 0.0


@pytest.mark.slow
def test_smollm2_packing_on_bbc_instructions_in_float32():
    from slimtune.app.instructions import bbc_instructions
    from slimtune.app.models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    blocks = chat_blocks(bbc_instructions("validation", "both", max_examples=12), tokenizer, 256)[:2]
    assert (blocks[:, :, 2] == 0).sum() >= 6
    # measured: 0 for the first example of a block, 7.4e-5 for later ones (logits up to 38): float32 rounding at
    # another offset, as large as between a causal run of an example alone and one with other tokens after it
    assert worst_leak(model, blocks, tokenizer.pad_token_id) <= 2e-4
    assert worst_leak(model.double(), blocks) <= 1e-9  # measured: 2.5e-14


def test_packing_leak_finds_a_model_whose_attention_mixes_examples(words):
    from slimtune.linear_attention import LinearizeConfig, linearize

    blocks = chat_blocks(reversal_chats(10), words, 48)
    index = int((blocks[:, :, 2] == 0).sum(1).argmax())  # the block with the most examples
    assert packing_leak(tiny_llama(), blocks, index) <= 1e-5  # measured: 0.0
    linear = linearize(tiny_llama(), LinearizeConfig())  # its recurrence runs across the whole block
    assert packing_leak(linear, blocks, index) > 1e-2 and worst_leak(linear, blocks, words.eos_token_id) > 1e-2


def reference_answer_loss(model: torch.nn.Module, examples: list[Example]) -> float:
    """Mean over all answer tokens of -log p(token | its example's earlier tokens), each example run alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([example.input_ids])).logits[0].double(), -1)
            for t in range(1, len(example)):
                if example.labels[t] != -100:
                    total -= log_probs[t - 1, example.labels[t]].item()
                    count += 1
    return total / count


def test_masked_loss_is_the_mean_over_answer_tokens(words):
    model = tiny_llama()
    chats = reversal_chats(10)
    blocks = chat_blocks(chats, words, 48)
    expected = reference_answer_loss(model, encode_examples(chats, words))
    with torch.no_grad():
        assert masked_lm_loss(model, blocks).item() == pytest.approx(expected, rel=1e-5)
    assert evaluate_loss(model, blocks, masked_lm_loss, batch_size=len(blocks)) == pytest.approx(expected, rel=1e-5)


def test_evaluation_in_batches_is_the_mean_over_all_answer_tokens(words):
    model = tiny_llama()
    chats = reversal_chats(10)
    expected = reference_answer_loss(model, encode_examples(chats, words))
    blocks = chat_blocks(chats, words, 48)
    assert evaluate_loss(model, blocks, masked_lm_loss, batch_size=1) == pytest.approx(expected, rel=1e-5)


# --- training -----------------------------------------------------------------------------------------------------


def test_training_on_packed_chats_lowers_the_answer_loss(words):
    model = tiny_llama()  # all parameters trained: the answers' letters are new to a random model
    train_blocks = chat_blocks(reversal_chats(40, seed=0), words, 48)
    held_out = chat_blocks(reversal_chats(10, seed=1), words, 48)
    before = evaluate_loss(model, held_out, masked_lm_loss)
    config = TrainConfig(steps=30, batch_size=4, lr=3e-3, seed=0, progress=False)
    result = train(model, train_blocks, config, held_out, loss_fn=masked_lm_loss)
    assert result.eval_losses[30] < before - 1.0  # measured: 4.59 -> 3.28
    assert max(result.losses[-5:]) < min(result.losses[:3]) - 0.8


def test_gradient_accumulation_weighs_every_answer_token_the_same(words):
    blocks = chat_blocks(reversal_chats(16), words, 48)
    assert len(set((blocks[..., 1] != -100).sum(1).tolist())) > 1  # blocks hold different numbers of answers
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = st.get_adapted_model(tiny_llama(), st.LoraConfig(r=4, alpha=8.0))
        config = TrainConfig(steps=2, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, progress=False)
        result = train(model, blocks, config, loss_fn=masked_lm_loss)
        runs[grad_accum] = ({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, result.losses)
    # measured: weights 8e-8 apart when each answer token weighs the same, 3e-2 when each micro-batch does
    assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-6)
    for name, tensor in runs[1][0].items():
        torch.testing.assert_close(runs[2][0][name], tensor, rtol=1e-5, atol=1e-6)
