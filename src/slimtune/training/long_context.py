"""Long-context evaluation of any causal LM (the original, a linearised one, an adapted one): passkey retrieval
scored by log-likelihood, next-token loss by position bucket, and the cache bytes and time of one prefill.

Passkey retrieval follows Landmark Attention (Mohtashami & Jaggi, 2023) and LongLoRA (Chen et al., 2023): their task
description, their filler ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
again." repeated), the needle "The pass key is K. Remember it. K is the pass key." with a 5-digit key K, and the
question "What is the pass key? The pass key is" at the end. :func:`passkey_prompt` builds one prompt at an exact
token length; :func:`passkey_accuracy` scores a grid of lengths × depths teacher-forced, one forward per prompt and
no generation loop: the key counts as retrieved when every answer token is the argmax of the logits at its
position, which is exactly when greedy decoding would write it; the answer's summed log-probability is kept too.
Beside that strict score, the key's own tokens are scored with the tokens before them given (the space the answer
starts with, where the tokenizer writes it as a token of its own): a model that knows the key but would open its
answer with another word fails the first and passes the second.

:func:`position_losses` gives the mean next-token loss of the tokens in each position bucket of long blocks, and
:func:`prefill_cost` the seconds of one prefill and the bytes of the cache it leaves (KV cache or linear state).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import check_int, check_number
from slimtune.errors import ConfigError
from slimtune.linear_attention.cache import cache_nbytes
from slimtune.training.evaluate import check_blocks, model_device

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
LENGTHS = (256, 512, 1024, 2048, 4096)
DEPTHS = (0.1, 0.5, 0.9)
BUCKETS = ((0, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 4096))


class PasskeyPrompt(NamedTuple):
    """``input_ids`` [T] (the prompt), ``answer_ids`` [A] (the key, as it follows the prompt) and the token index in
    ``input_ids`` where the needle starts."""

    input_ids: torch.Tensor
    answer_ids: torch.Tensor
    needle_position: int


def passkey_prompt(tokenizer: Any, total_tokens: int, depth: float, key: int) -> PasskeyPrompt:
    """The passkey prompt whose tokens and answer's together are exactly ``total_tokens`` (the length the model reads
    when scored); ``depth`` in [0, 1] places the needle in the filler, ``key`` is a 5-digit int.

    Layout: task description (with the tokenizer's special tokens, e.g. a BOS), filler, needle, filler, question,
    then the answer " K". Every piece is tokenised alone, each but the first with a leading space, so their token
    counts add up exactly. The filler is the five sentences repeated and cut to the tokens left, so its last
    sentence may be cut short before the question (as LongLoRA cuts its filler by characters); the needle goes in at
    the sentence boundary nearest ``depth`` × the filler's tokens.

    Raises:
        ConfigError: ``total_tokens`` not an int or too small for the fixed pieces, ``depth`` not in [0, 1], ``key``
            not in 10000 .. 99999.
    """
    check_int("total_tokens", total_tokens)
    _check_depth("depth", depth)
    if isinstance(key, bool) or not isinstance(key, int) or not 10000 <= key <= 99999:
        raise ConfigError(f"key={key!r} is not allowed: expected a 5-digit int, 10000 .. 99999")
    head = _encode(tokenizer, TASK, special=True)
    needle = _encode(tokenizer, " " + NEEDLE.format(key=key))
    question = _encode(tokenizer, " " + QUESTION)
    answer = _encode(tokenizer, f" {key}")
    fixed = len(head) + len(needle) + len(question) + len(answer)
    room = total_tokens - fixed
    if room < 0:
        raise ConfigError(
            f"total_tokens={total_tokens} (a passkey prompt's length with its answer) is not allowed: the task "
            f"description, needle, question and answer alone take {fixed} tokens with this tokenizer; expected at "
            f"least {fixed}"
        )
    sentences = [_encode(tokenizer, " " + sentence) for sentence in FILLER]
    filler: list[int] = []
    bounds = [0]  # token offsets in the filler where a sentence starts
    while len(filler) < room:
        filler += sentences[(len(bounds) - 1) % len(sentences)]
        bounds.append(len(filler))
    filler = filler[:room]
    cut = min((b for b in bounds if b <= room), key=lambda b: abs(b - depth * room))
    ids = head + filler[:cut] + needle + filler[cut:] + question
    return PasskeyPrompt(torch.tensor(ids), torch.tensor(answer), len(head) + cut)


def key_start(tokenizer: Any, answer_ids: torch.Tensor) -> int:
    """The index in ``answer_ids`` [A] (" K", as :func:`passkey_prompt` encodes it) of the key's first own token: the
    number of tokens the tokenizer writes a lone space as, when the answer starts with them (1 for Llama and SmolLM2
    tokenizers, whose digits are tokens of their own), else 0."""
    space = _encode(tokenizer, " ")
    return len(space) if len(answer_ids) > len(space) and answer_ids[: len(space)].tolist() == space else 0


@dataclasses.dataclass(frozen=True)
class PasskeyCell:
    """One (length, depth) cell: ``keys`` prompts, ``retrieved`` of them answered; ``log_likelihood`` is the mean
    summed log-probability of the answer; ``inside`` prompts had their needle within the window, ``retrieved_inside``
    of which were answered; ``key_retrieved`` prompts had the key's own tokens right with the answer's leading space
    given (:class:`AnswerScore`)."""

    length: int
    depth: float
    keys: int
    retrieved: int
    log_likelihood: float
    inside: int
    retrieved_inside: int
    key_retrieved: int

    @property
    def accuracy(self) -> float:
        return self.retrieved / self.keys

    @property
    def key_accuracy(self) -> float:
        return self.key_retrieved / self.keys


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    """The cells of :func:`passkey_accuracy` (lengths outer, depths inner) and the window they were split by."""

    cells: list[PasskeyCell]
    window: int | None

    @property
    def accuracy(self) -> float:
        """Retrieved / prompts over every cell."""
        return sum(c.retrieved for c in self.cells) / sum(c.keys for c in self.cells)

    @property
    def accuracy_inside(self) -> float | None:
        """Accuracy over the needles within the last ``window`` prompt tokens (None when there are none)."""
        inside = sum(c.inside for c in self.cells)
        return sum(c.retrieved_inside for c in self.cells) / inside if inside else None

    @property
    def accuracy_outside(self) -> float | None:
        """Accuracy over the needles further back than ``window`` tokens (None when there are none)."""
        outside = sum(c.keys - c.inside for c in self.cells)
        retrieved = sum(c.retrieved - c.retrieved_inside for c in self.cells)
        return retrieved / outside if outside else None

    @property
    def key_accuracy(self) -> float:
        """Over every cell: the prompts whose key's own tokens were right with the leading space given."""
        return sum(c.key_retrieved for c in self.cells) / sum(c.keys for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        """The summary and every cell (with its accuracy), for a JSON record."""
        cells = [{**dataclasses.asdict(c), "accuracy": c.accuracy, "key_accuracy": c.key_accuracy} for c in self.cells]
        return {
            "window": self.window,
            "accuracy": self.accuracy,
            "accuracy_inside": self.accuracy_inside,
            "accuracy_outside": self.accuracy_outside,
            "key_accuracy": self.key_accuracy,
            "needles_inside": sum(c.inside for c in self.cells),
            "needles_outside": sum(c.keys - c.inside for c in self.cells),
            "cells": cells,
        }


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int] = LENGTHS,
    depths: Sequence[float] = DEPTHS,
    keys_per_cell: int = 20,
    seed: int = 0,
    window: int | None = None,
) -> PasskeyResult:
    """Passkey retrieval of ``model`` at every (length, depth): ``keys_per_cell`` prompts each (:func:`passkey_prompt`).

    Keys are drawn uniformly from 10000 .. 99999 by one generator seeded with ``seed``, cell after cell. Each prompt
    is scored by :func:`score_answer`, in eval mode (the model's mode is restored afterwards). A needle is "inside"
    when it starts within the last ``window`` prompt tokens, so that the softmax window of that size of the query
    predicting the first answer token (the last prompt token) holds all of it; ``window=None`` counts every needle
    as inside.

    Raises:
        ConfigError: empty or invalid ``lengths`` / ``depths``, a length above the model's
            ``max_position_embeddings`` or too short for the prompt, ``keys_per_cell`` < 1, ``window`` < 1.
    """
    _check_values("lengths", lengths, lambda v: check_int("lengths", v))
    _check_values("depths", depths, lambda v: _check_depth("depths", v))
    check_int("keys_per_cell", keys_per_cell)
    check_int("seed", seed, minimum=0)
    check_int("window", window, optional=True)
    check_context(model, "lengths", max(lengths))
    generator = torch.Generator().manual_seed(seed)
    grid = []
    for length in lengths:
        for depth in depths:
            keys = torch.randint(10000, 100000, (keys_per_cell,), generator=generator).tolist()
            prompts = [passkey_prompt(tokenizer, length, depth, key) for key in keys]
            grid.append((length, depth, [(p, key_start(tokenizer, p.answer_ids)) for p in prompts]))
    was_training = model.training
    model.eval()
    try:
        cells = [_score_cell(model, length, depth, prompts, window) for length, depth, prompts in grid]
    finally:
        model.train(was_training)
    return PasskeyResult(cells, window)


def _score_cell(
    model: nn.Module, length: int, depth: float, prompts: list[tuple[PasskeyPrompt, int]], window: int | None
) -> PasskeyCell:
    """The cell of ``prompts``: (prompt, its :func:`key_start`) each."""
    retrieved, inside, retrieved_inside, key_retrieved, total = 0, 0, 0, 0, 0.0
    for prompt, start in prompts:
        score = score_answer(model, prompt.input_ids, prompt.answer_ids, start)
        near = window is None or len(prompt.input_ids) - prompt.needle_position <= window
        retrieved += score.retrieved
        inside += near
        retrieved_inside += score.retrieved and near
        key_retrieved += score.key_retrieved
        total += score.log_likelihood
    mean = total / len(prompts)
    return PasskeyCell(length, depth, len(prompts), retrieved, mean, inside, retrieved_inside, key_retrieved)


class AnswerScore(NamedTuple):
    """How a model answers a passkey prompt, teacher-forced (:func:`score_answer`)."""

    retrieved: bool  # every answer token is the argmax: greedy decoding writes the answer
    log_likelihood: float  # Σ log p(answer token), float32
    key_retrieved: bool  # every answer token from key_start on is the argmax, the tokens before it given


@torch.no_grad()
def score_answer(
    model: nn.Module, input_ids: torch.Tensor, answer_ids: torch.Tensor, key_start: int = 0
) -> AnswerScore:
    """The :class:`AnswerScore` of ``answer_ids`` [A] after ``input_ids`` [T], from one forward over [1, T + A].

    Retrieved: every answer token is the argmax of the logits at the position before it (ties go to the lowest
    token id, as ``argmax`` breaks them). Log-likelihood: Σ_j log softmax(logits_{T-1+j})[answer_j], in float32.
    Key retrieved: the same for answer tokens ``key_start`` .. A-1 only (the ones before them are given, as in any
    teacher-forced scoring).
    """
    device = model_device(model)
    answer = answer_ids.to(device)
    n = len(answer)
    ids = torch.cat([input_ids.to(device), answer])[None]  # [1, T + A]
    logits = _logits(model, ids, keep=n + 1)[0, -(n + 1) : -1].float()  # [A, V]: positions T-1 .. T+A-2
    right = logits.argmax(-1) == answer  # [A]
    log_likelihood = logits.log_softmax(-1).gather(-1, answer[:, None]).sum().item()
    return AnswerScore(bool(right.all()), log_likelihood, bool(right[key_start:].all()))


@torch.no_grad()
def position_losses(
    model: nn.Module, blocks: torch.Tensor, buckets: Sequence[tuple[int, int]] = BUCKETS, batch_size: int = 1
) -> dict[str, float]:
    """Mean next-token cross-entropy of ``model`` on ``blocks`` [n, T] by position bucket, as {"lo-hi": loss}.

    The loss at position i (1 ≤ i < T) is −log p(token_i | tokens_<i), computed in float32 from the logits; bucket
    (lo, hi) averages the positions lo ≤ i < hi of every block (position 0 has no loss). Buckets that reach past
    the blocks (hi > T) are left out, so every reported bucket covers all its positions. Eval mode, restored
    afterwards; ``batch_size`` blocks per forward.

    Raises:
        ConfigError: invalid ``blocks`` or ``buckets`` (pairs of ints 0 ≤ lo < hi, hi ≥ 2, no repeats), no bucket
            within T, T above the model's ``max_position_embeddings``, ``batch_size`` < 1.
    """
    if isinstance(blocks, torch.Tensor) and blocks.dim() != 2:
        raise ConfigError(f"blocks has shape {tuple(blocks.shape)}: expected token ids [n_blocks, seq_len]")
    check_blocks("blocks", blocks, model)
    _check_buckets(buckets)
    check_int("batch_size", batch_size)
    n, length = blocks.shape
    check_context(model, "blocks", length)
    kept = [(lo, hi) for lo, hi in buckets if hi <= length]
    if not kept:
        raise ConfigError(
            f"blocks of seq_len={length} hold none of the buckets {list(buckets)}: expected seq_len >= "
            f"{min(hi for _, hi in buckets)}"
        )
    was_training = model.training
    model.eval()
    total = torch.zeros(length - 1, dtype=torch.float64)  # summed loss of positions 1 .. T-1
    try:
        for start in range(0, n, batch_size):
            batch = blocks[start : start + batch_size].to(model_device(model))  # [b, T]
            logits = _logits(model, batch).float()  # [b, T, V]
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [b, T-1]
            total += losses.sum(0).double().cpu()
    finally:
        model.train(was_training)
    mean = total / n  # [T-1]: index i-1 holds position i
    return {f"{lo}-{hi}": mean[max(lo, 1) - 1 : hi - 1].mean().item() for lo, hi in kept}


@torch.no_grad()
def prefill_cost(model: nn.Module, length: int, batch: int = 1, seed: int = 0) -> tuple[float, int]:
    """(seconds, cache bytes) of one prefill forward over random token ids [batch, length] with ``use_cache=True``.

    The bytes are those of the cache the forward returns (:func:`slimtune.linear_attention.cache_nbytes`: the
    keys/values of a KV cache, or a linearised model's constant-size states). One timed call, no warm-up: warm the
    model up first for steady timings. Eval mode, restored afterwards.

    Raises:
        ConfigError: ``length`` or ``batch`` < 1, ``length`` above the model's ``max_position_embeddings``, or a
            model that returns no cache.
    """
    check_int("length", length)
    check_int("batch", batch)
    check_context(model, "length", length)
    vocab = cast(Any, model).get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **_keep_kwargs(model, 1))
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ConfigError(f"{type(model).__name__} returned no past_key_values with use_cache=True: no cache to size")
    return seconds, cache_nbytes(cache)


def check_context(model: nn.Module, field: str, length: int) -> None:
    """ConfigError when ``length`` tokens exceed the model config's ``max_position_embeddings`` (when it has one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ConfigError(
            f"{field} asks for {length} tokens: allowed are at most {limit}, the model's max_position_embeddings"
        )


def _logits(model: nn.Module, ids: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits [B, ≤T, V] of ids [B, T] without a cache; with ``keep``, only the last ``keep`` positions' when the
    model takes ``logits_to_keep`` (Hugging Face causal LMs), else all of them."""
    return model(input_ids=ids, use_cache=False, **_keep_kwargs(model, keep)).logits


def _keep_kwargs(model: nn.Module, keep: int | None) -> dict[str, int]:
    takes_it = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": keep} if keep is not None and takes_it else {}


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_depth(field: str, depth: Any) -> None:
    check_number(field, depth, at_least=0)
    if depth > 1:
        raise ConfigError(f"{field} holds {depth!r}: allowed are fractions of the filler from 0 (start) to 1 (end)")


def _check_values(field: str, values: Any, check: Any) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{field}={values!r} is not allowed: expected a non-empty sequence")
    for value in values:
        check(value)


def _check_buckets(buckets: Any) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"buckets={buckets!r} is not allowed: {why}")

    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise bad("expected a non-empty sequence of (lo, hi) position pairs")
    for bucket in buckets:
        ok = isinstance(bucket, (tuple, list)) and len(bucket) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in bucket)
        if not ok or not 0 <= bucket[0] < bucket[1] or bucket[1] < 2:
            raise bad(f"{bucket!r} is not a pair of ints 0 <= lo < hi with hi >= 2 (position 0 has no loss)")
    if len({tuple(b) for b in buckets}) != len(buckets):
        raise bad("a bucket is repeated")
