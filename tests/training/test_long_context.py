"""Long-context evaluation: the passkey prompt's layout, its scoring against greedy decoding and hand-gathered
log-probabilities, stub models that always / never know the key, position-bucket losses against a per-position
loop, and the bytes of a prefill's cache against the tensor shapes they come from."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import slimtune as st
from cases import tiny_llama
from slimtune.linear_attention import LinearizeConfig, linear_attention_layers, linearize
from slimtune.training.long_context import (
    FILLER,
    TASK,
    key_start,
    passkey_accuracy,
    passkey_prompt,
    position_losses,
    prefill_cost,
    score_answer,
)
from train_script import save_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION_TAIL = " What is the pass key? The pass key is"
NEEDLE_TEXT = " The pass key is 52817. Remember it. 52817 is the pass key."


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """The character tokenizer of the CLI tests' tiny folder: one token per printable character, no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(save_tiny_folder(tmp_path_factory.mktemp("tiny")))


def long_llama() -> nn.Module:
    """tiny_llama() reading up to 1024 positions (its rotary embeddings do not depend on the limit)."""
    model = tiny_llama()
    model.config.max_position_embeddings = 1024
    return model


def text_of(tokenizer, ids: torch.Tensor) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids.tolist()))


class Induction(nn.Module):
    """A causal stub LM: the logits at t are ``strength`` on the token that followed the latest earlier occurrence
    of the last ``k`` tokens (an induction head: it copies the key from the needle), plus noise fixed per position."""

    def __init__(self, strength: float, noise: float = 0.0, k: int = 8, vocab: int = 101) -> None:
        super().__init__()
        self.strength, self.k = strength, k
        self.noise = noise * torch.randn(2048, vocab, generator=torch.Generator().manual_seed(7))
        self.anchor = nn.Parameter(torch.zeros(()))
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        self.modes.append(self.training)
        b, t = input_ids.shape
        logits = self.noise[:t].repeat(b, 1, 1)  # [B, T, V]
        for row in range(b):
            seq, last = input_ids[row].tolist(), {}
            for i in range(self.k - 1, t):
                context = tuple(seq[i - self.k + 1 : i + 1])
                if context in last:
                    logits[row, i, seq[last[context] + 1]] += self.strength
                last[context] = i
        return SimpleNamespace(logits=logits)


class Uniform(nn.Module):
    """A stub LM whose logits are all zero: every token is equally likely."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 101))


def greedy_reference(model: nn.Module, input_ids: torch.Tensor, answer_ids: torch.Tensor) -> tuple[bool, float]:
    """(greedy decoding writes the answer, Σ log p(answer_j)) by one-token steps and log-sum-exp by hand."""
    ids = input_ids.clone()
    for _ in range(len(answer_ids)):
        logits = model(input_ids=ids[None]).logits[0, -1]
        ids = torch.cat([ids, logits.argmax()[None]])
    written = ids[len(input_ids) :]
    logits = model(input_ids=torch.cat([input_ids, answer_ids])[None]).logits[0].double()
    total = 0.0
    for j, token in enumerate(answer_ids.tolist()):
        row = logits[len(input_ids) - 1 + j]
        total += (row[token] - row.exp().sum().log()).item()
    return bool(torch.equal(written, answer_ids)), total


def key_reference(model: nn.Module, input_ids: torch.Tensor, answer_ids: torch.Tensor, start: int) -> bool:
    """Each answer token from ``start`` on is the argmax after the prompt and the answer tokens before it, one
    forward per token."""
    for j in range(start, len(answer_ids)):
        logits = model(input_ids=torch.cat([input_ids, answer_ids[:j]])[None]).logits[0, -1]
        if logits.argmax().item() != answer_ids[j].item():
            return False
    return True


class OpensWithAnotherWord(Induction):
    """Knows the key (the induction stub) but, after "is", prefers the token "T" to anything else: it would answer
    "The pass key is T..." rather than " 52817", while the key's digits, the space given, are right."""

    def __init__(self, t_token: int, i_token: int, s_token: int) -> None:
        super().__init__(strength=10.0)
        self.t_token, self.i_token, self.s_token = t_token, i_token, s_token

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        logits = super().forward(input_ids).logits
        after_is = (input_ids[:, 1:] == self.s_token) & (input_ids[:, :-1] == self.i_token)  # [B, T-1]
        logits[:, 1:][after_is] = logits[:, 1:][after_is].index_fill(-1, torch.tensor([self.t_token]), 30.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("total", [251, 260, 333, 517])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_has_the_length_the_needle_at_its_depth_and_the_key_as_answer(chars, total, depth):
    input_ids, answer_ids, needle = passkey_prompt(chars, total, depth, 52817)
    assert len(input_ids) + len(answer_ids) == total
    start = key_start(chars, answer_ids)
    assert start == 1 and text_of(chars, answer_ids[start:]) == "52817"  # " " is a token of its own
    text = text_of(chars, input_ids)  # one character per token
    assert text_of(chars, answer_ids) == " 52817"
    assert text.startswith(TASK) and text.endswith(QUESTION_TAIL)
    assert text.count(NEEDLE_TEXT) == 1 and needle == text.index(NEEDLE_TEXT)
    filler = text[len(TASK) : -len(QUESTION_TAIL)].replace(NEEDLE_TEXT, "")
    before = needle - len(TASK)
    assert abs(before - depth * len(filler)) <= max(len(s) + 1 for s in FILLER)  # within one sentence
    assert before == 0 or filler[before - 1] == "."  # at a sentence boundary


def test_prompt_refuses_careless_values(chars):
    with pytest.raises(st.ConfigError, match=r"total_tokens=250 .*expected at least 251"):
        passkey_prompt(chars, 250, 0.5, 12345)
    for depth in (-0.1, 1.5, "0.5", math.nan):
        with pytest.raises(st.ConfigError, match="depth"):
            passkey_prompt(chars, 300, depth, 12345)
    for key in (1234, 100000, True, "12345"):
        with pytest.raises(st.ConfigError, match=r"key=.*5-digit"):
            passkey_prompt(chars, 300, 0.5, key)


@pytest.mark.parametrize("kind", ["tiny-llama", "induction-stub"])
def test_scoring_equals_greedy_decoding_and_hand_gathered_log_probabilities(chars, kind):
    model = long_llama() if kind == "tiny-llama" else Induction(strength=3.5, noise=1.0)
    hits = []
    for total, depth, key in [(280, 0.3, 10007), (300, 0.7, 99999), (333, 0.5, 48151), (351, 0.9, 62342)]:
        prompt = passkey_prompt(chars, total, depth, key)
        retrieved, log_likelihood, key_retrieved = score_answer(model, prompt.input_ids, prompt.answer_ids, 1)
        expected_hit, expected_ll = greedy_reference(model, prompt.input_ids, prompt.answer_ids)
        assert retrieved == expected_hit
        assert log_likelihood == pytest.approx(expected_ll, rel=1e-5, abs=1e-4)
        assert key_retrieved == key_reference(model, prompt.input_ids, prompt.answer_ids, 1)
        hits.append(retrieved)
    if isinstance(model, Induction):
        assert any(hits) and not all(hits), hits  # both outcomes are compared


def test_a_model_that_knows_the_key_scores_one_and_uniform_logits_zero(chars):
    knows = Induction(strength=10.0)
    knows.train()
    result = passkey_accuracy(knows, chars, lengths=(260, 300), depths=(0.1, 0.9), keys_per_cell=3, window=120)
    assert result.accuracy == 1.0 and result.accuracy_inside == 1.0 and result.accuracy_outside == 1.0
    assert knows.training and set(knows.modes) == {False}  # scored in eval mode, the mode restored
    uniform = passkey_accuracy(Uniform(), chars, lengths=(260,), depths=(0.5,), keys_per_cell=4)
    assert uniform.accuracy == 0.0 and uniform.accuracy_outside is None
    assert uniform.cells[0].log_likelihood == pytest.approx(-6 * math.log(101))  # " " and five digits


class WordPieces:
    """A stub tokenizer that writes " " as token 0 and each of " 1", "2", ... "9" and "0" as one token: a leading
    space that is not a token of its own."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        if text == " ":
            return {"input_ids": [0]}
        return {"input_ids": [1 + int(text[1])] + [11 + int(c) for c in text[2:]]}


def test_the_key_starts_after_a_lone_space_token_and_at_0_when_the_space_is_part_of_a_digit(chars):
    assert key_start(chars, torch.tensor(chars(" 52817")["input_ids"])) == 1
    pieces = WordPieces()
    assert key_start(pieces, torch.tensor(pieces(" 52817")["input_ids"])) == 0


def test_a_model_that_knows_the_key_but_opens_with_another_word_fails_strictly_and_passes_on_the_key(chars):
    t, i, s = chars.convert_tokens_to_ids(["T", "i", "s"])
    result = passkey_accuracy(OpensWithAnotherWord(t, i, s), chars, lengths=(260, 300), depths=(0.5,), keys_per_cell=3)
    assert result.accuracy == 0.0 and result.key_accuracy == 1.0
    assert [cell["key_accuracy"] for cell in result.to_dict()["cells"]] == [1.0, 1.0]
    assert passkey_accuracy(Induction(strength=10.0), chars, (260,), (0.5,), keys_per_cell=3).key_accuracy == 1.0
    assert passkey_accuracy(Uniform(), chars, (260,), (0.5,), keys_per_cell=3).key_accuracy == 0.0


def test_accuracy_grid_equals_the_reference_cell_by_cell(chars):
    model = Induction(strength=3.5, noise=1.0)
    lengths, depths, keys, window = (280, 330), (0.2, 0.9), 3, 110
    result = passkey_accuracy(model, chars, lengths, depths, keys_per_cell=keys, seed=5, window=window)
    generator = torch.Generator().manual_seed(5)
    assert [(c.length, c.depth) for c in result.cells] == [(n, d) for n in lengths for d in depths]
    near_hits = far_hits = near = far = 0
    for cell in result.cells:
        drawn = torch.randint(10000, 100000, (keys,), generator=generator).tolist()
        outcomes = []
        for key in drawn:
            prompt = passkey_prompt(chars, cell.length, cell.depth, key)
            text = text_of(chars, prompt.input_ids)
            inside = len(text) - text.index(" The pass key is") <= window
            outcomes.append((*greedy_reference(model, prompt.input_ids, prompt.answer_ids), inside))
        assert cell.retrieved == sum(hit for hit, _, _ in outcomes)
        assert cell.inside == sum(inside for _, _, inside in outcomes)
        assert cell.retrieved_inside == sum(hit and inside for hit, _, inside in outcomes)
        prompts = [passkey_prompt(chars, cell.length, cell.depth, key) for key in drawn]
        assert cell.key_retrieved == sum(key_reference(model, p.input_ids, p.answer_ids, 1) for p in prompts)
        assert cell.log_likelihood == pytest.approx(sum(ll for _, ll, _ in outcomes) / keys, rel=1e-5)
        near_hits += sum(hit and inside for hit, _, inside in outcomes)
        far_hits += sum(hit and not inside for hit, _, inside in outcomes)
        near += sum(inside for _, _, inside in outcomes)
        far += sum(not inside for _, _, inside in outcomes)
    assert near and far  # the window splits the needles
    assert result.accuracy_inside == near_hits / near and result.accuracy_outside == far_hits / far
    assert result.to_dict()["needles_inside"] == near
    everything = passkey_accuracy(model, chars, lengths, depths, keys_per_cell=keys, seed=5)
    assert all(c.inside == c.keys for c in everything.cells) and everything.accuracy == result.accuracy


def test_passkey_accuracy_refuses_careless_values(chars):
    model = long_llama()
    for kwargs, message in [
        ({"lengths": (2048,)}, r"lengths asks for 2048 tokens: allowed are at most 1024"),
        ({"lengths": ()}, r"lengths=\(\) is not allowed"),
        ({"lengths": (0,)}, "lengths=0"),
        ({"depths": (0.5, 1.2)}, "depths holds 1.2"),
        ({"keys_per_cell": 0}, "keys_per_cell=0"),
        ({"window": 0}, "window=0"),
        ({"lengths": (200,)}, "expected at least 251"),
    ]:
        settings = {"lengths": (260,), "depths": (0.5,), "keys_per_cell": 1, **kwargs}
        with pytest.raises(st.ConfigError, match=message):
            passkey_accuracy(model, chars, **settings)


def test_position_losses_equal_a_per_position_loop():
    model = tiny_llama()
    blocks = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(0))
    buckets = ((0, 8), (8, 20), (20, 40), (40, 64))
    result = position_losses(model, blocks, buckets, batch_size=2)
    assert list(result) == ["0-8", "8-20", "20-40"]  # 40-64 reaches past the blocks
    with torch.no_grad():
        logits = model(blocks).logits.double()
    by_bucket: dict[str, list[float]] = {label: [] for label in result}
    for b in range(3):
        for i in range(1, 40):  # the loss of token i given tokens < i
            row = logits[b, i - 1]
            loss = (row.exp().sum().log() - row[blocks[b, i]]).item()
            label = next(f"{lo}-{hi}" for lo, hi in buckets if lo <= i < hi)
            by_bucket[label].append(loss)
    for label, losses in by_bucket.items():
        assert result[label] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert position_losses(model, blocks, buckets, batch_size=1) == pytest.approx(result, rel=1e-6)


@pytest.mark.parametrize(
    "buckets",
    [(), "0-64", ((0,),), ((5, 5),), ((-1, 4),), ((0, 1),), ((0, 8), (0, 8)), ((0.0, 8),), ((True, 8),)],
)
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(st.ConfigError, match="buckets="):
        position_losses(tiny_llama(), torch.zeros(1, 16, dtype=torch.long), buckets)


def test_position_losses_refuse_blocks_they_cannot_use():
    model = tiny_llama()
    with pytest.raises(st.ConfigError, match=r"seq_len=16 hold none of the buckets.*expected seq_len >= 64"):
        position_losses(model, torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(st.ConfigError, match=r"blocks asks for 80 tokens: allowed are at most 64"):
        position_losses(model, torch.zeros(1, 80, dtype=torch.long), ((0, 8),))
    with pytest.raises(st.ConfigError, match="expected token ids"):
        position_losses(model, torch.zeros(1, 16, 3, dtype=torch.long), ((0, 8),))
    with pytest.raises(st.ConfigError, match="batch_size=0"):
        position_losses(model, torch.zeros(1, 16, dtype=torch.long), ((0, 8),), batch_size=0)


def test_prefill_cost_counts_the_kv_cache_and_the_constant_linear_state():
    model = tiny_llama()  # 2 layers, 2 key/value heads of 12
    seconds, kv = prefill_cost(model, 30)
    assert seconds > 0 and kv == 2 * 2 * (2 * 30 * 12) * 4  # layers x (keys, values) x [Hkv, T, d] x fp32
    assert prefill_cost(model, 15, batch=2)[1] == kv
    linear = linearize(tiny_llama(), LinearizeConfig())
    h, m, d = next((la.num_heads, la.feature_map.m, la.head_dim) for _, la in linear_attention_layers(linear))
    state = 2 * (h * m * d + h * m + h) * 4  # layers x (S [H, m, d] + z [H, m] + shift [H]) x fp32
    assert prefill_cost(linear, 20)[1] == state and prefill_cost(linear, 40)[1] == state
    for length, message in [(0, "length=0"), (65, "length asks for 65 tokens")]:
        with pytest.raises(st.ConfigError, match=message):
            prefill_cost(model, length)


def test_a_needle_is_inside_when_it_starts_among_the_last_window_prompt_tokens(chars):
    prompt = passkey_prompt(chars, 300, 0.9, 12345)  # every 5-digit key gives the same layout
    distance = len(prompt.input_ids) - prompt.needle_position
    for window, inside in [(distance, 2), (distance - 1, 0)]:
        result = passkey_accuracy(Uniform(), chars, (300,), (0.9,), keys_per_cell=2, window=window)
        assert result.cells[0].inside == inside
