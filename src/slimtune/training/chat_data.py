"""Chat and instruction data: ``.jsonl`` examples whose loss is on the answers only, packed into token blocks.

Two formats, one per file, one JSON object per non-blank line (other keys are ignored):

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``: rendered with the
  tokenizer's chat template; the loss is on every token an assistant turn adds (its content and the template's
  end-of-turn tokens, so the model learns to stop). The turns are found by rendering the conversation up to each
  assistant turn (with the generation prompt, then with the turn) and checking that each rendering tokenises to a
  prefix of the whole conversation's tokens; a template that rewrites earlier turns is refused with a DataError.
- ``{"prompt": "...", "completion": "..."}``: the prompt's tokens, the completion's tokens and the EOS token, the
  loss on the completion and EOS. Nothing is inserted between the two: end the prompt with the separator you want.

Text is tokenised without special tokens (a chat template writes its own). :func:`chat_blocks` packs the
examples with :func:`slimtune.training.data.pack_examples` into blocks [n, seq_len, 3] of (input_ids, labels,
position_ids), trained and evaluated with :func:`slimtune.training.losses.masked_lm_loss`; an example longer
than ``seq_len`` is an error unless ``too_long`` says to drop or truncate it. :func:`packing_leak` checks that a
model keeps packed examples apart (a model whose attention ignores the restarts of the position ids does not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError, DataError
from slimtune.fileio import atomic_write_jsonl
from slimtune.training.data import IGNORE_INDEX, Example, decode_text, pack_examples
from slimtune.training.evaluate import model_device

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion")
_EXPECTED = (
    "expected an object with 'messages' (a list of {'role', 'content'}) or with 'prompt' and 'completion' strings"
)


def read_chat_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The examples of a chat / instruction ``.jsonl`` file, checked as :func:`check_records` does.

    Raises:
        DataError: invalid JSON, a bad example (the message names the path and line, the field and what is
            allowed), two formats in one file, or no example.
        FileNotFoundError: ``path`` does not exist.
    """
    return _read_records(Path(path))[0]


def chat_format(path: str | os.PathLike) -> str | None:
    """``"messages"`` or ``"prompt_completion"`` when the first example of a ``.jsonl`` file is one, else None.

    For choosing between plain-text and chat training; the whole file is checked when it is read.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    for line in decode_text(path.read_bytes()).split("\n"):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return None
            if isinstance(record, dict) and "messages" in record:
                return "messages"
            return "prompt_completion" if isinstance(record, dict) and "prompt" in record else None
    return None


def check_records(records: Sequence[Any], where: Sequence[str] | None = None, source: str = "records") -> str:
    """The format shared by ``records`` (one of :data:`FORMATS`), after checking each as :func:`check_record`.

    ``where[i]`` names record i in messages (default ``"<source>, example <i>"``).

    Raises:
        DataError: no records, a bad record, or records of both formats.
    """
    if not records:
        raise DataError(f"{source}: no examples; {_EXPECTED} per line")
    names = list(where) if where is not None else [f"{source}, example {i}" for i in range(len(records))]
    first = check_record(records[0], names[0])
    for record, name in zip(records[1:], names[1:]):
        kind = check_record(record, name)
        if kind != first:
            raise DataError(
                f"{name}: a {kind!r} example, but {names[0]} is a {first!r} one; expected one format per file"
            )
    return first


def check_record(record: Any, where: str = "the example") -> str:
    """``"messages"`` or ``"prompt_completion"``: the format of one example, checked.

    Raises:
        DataError: not an object; neither or both formats' fields; a role other than system / user / assistant;
            a content, prompt or completion that is not a non-empty string; no assistant turn, or a conversation
            that opens with one (the message names ``where``, the field and the value).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: got a JSON {type(record).__name__}; {_EXPECTED}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise DataError(f"{where}: has both 'messages' and 'prompt' / 'completion'; {_EXPECTED}")
        _check_messages(record["messages"], where)
        return "messages"
    if "prompt" not in record and "completion" not in record:
        raise DataError(f"{where}: got an object with keys {sorted(record)}; {_EXPECTED}")
    for field in ("prompt", "completion"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}; {_EXPECTED}")
        _check_text(record[field], f"{where}: {field!r}")
    return "prompt_completion"


def write_chat_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``records`` (checked as :func:`check_records`) to ``path``, one JSON object per line, UTF-8, atomically."""
    check_records(records, source=str(path))
    atomic_write_jsonl(path, records)
    return Path(path)


def encode_examples(
    records: Sequence[dict[str, Any]], tokenizer: Any, where: Sequence[str] | None = None, source: str = "records"
) -> list[Example]:
    """``records`` (checked as :func:`check_records`) tokenised, with labels on the answer tokens only.

    Raises:
        ConfigError: prompt / completion with a tokenizer without an EOS token.
        DataError: a bad record; messages with a tokenizer without a chat template; a template that fails on a
            record or is not prefix-stable (the message names the record).
    """
    names = list(where) if where is not None else [f"{source}, example {i}" for i in range(len(records))]
    kind = check_records(records, names, source)
    if kind == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source} holds 'messages' examples, but tokenizer {type(tokenizer).__name__} has no chat_template: "
            "expected a chat model's tokenizer, or the examples written as 'prompt' / 'completion'"
        )
    if kind == "prompt_completion" and getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id: completions end with it")
    encode = _encode_messages if kind == "messages" else _encode_prompt_completion
    return [encode(record, tokenizer, name) for record, name in zip(records, names)]


def chat_blocks(
    data: str | os.PathLike | Sequence[dict[str, Any]],
    tokenizer: Any,
    seq_len: int,
    *,
    too_long: str = "error",
    max_blocks: int | None = None,
) -> torch.Tensor:
    """A chat / instruction ``.jsonl`` file, or its records, as packed blocks [n_blocks, seq_len, 3] (int64).

    The fields are (input_ids, labels, position_ids); see :func:`slimtune.training.data.pack_examples` for the
    packing, ``too_long`` ("error", "drop" or "truncate") and ``max_blocks``. Padding is the tokenizer's pad
    token, else its EOS token. Train on the blocks with ``loss_fn=masked_lm_loss``.

    Raises:
        ConfigError: as :func:`encode_examples` and :func:`~slimtune.training.data.pack_examples`.
        DataError: as :func:`read_chat_jsonl` and :func:`encode_examples`; examples longer than ``seq_len``
            under ``too_long="error"`` (how many, and the longest).
    """
    if isinstance(data, (str, os.PathLike)):
        records, names = _read_records(Path(data))
        examples = encode_examples(records, tokenizer, names, source=str(data))
    else:
        examples = encode_examples(data, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = tokenizer.eos_token_id if pad is None else pad
    if pad is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither pad_token_id nor eos_token_id")
    return pack_examples(examples, seq_len, pad, too_long, max_blocks)


@torch.no_grad()
def packing_leak(model: nn.Module, blocks: torch.Tensor, index: int = 0) -> float:
    """How much the examples of packed block ``blocks[index]`` [seq_len, 3] see each other in ``model``.

    The largest |logit| difference between each example as :func:`~slimtune.training.losses.masked_lm_loss`
    runs it (inside the block) and as a plain causal run of the example followed by filler to ``seq_len`` (the
    same shapes). For a Hugging Face Llama with sdpa or eager attention only rounding is left: 0.0 or up to
    ~1e-4 in float32 for SmolLM2 (an example later in a block rounds differently), ~1e-13 in float64. A model
    whose attention ignores the restarts of the position ids, such as slimtune's linear attention, gives 1e-2
    and more: it must not be trained on packed examples. Runs in eval mode.
    """
    was_training = model.training
    model.eval()
    ids, labels, positions = blocks[index].to(model_device(model)).unbind(-1)  # each [T]
    starts = (positions == 0).nonzero().flatten().tolist()
    spans = [(s, e) for s, e in zip(starts, [*starts[1:], len(ids)]) if (labels[s:e] != IGNORE_INDEX).any()]
    packed = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]  # [T, V]
    worst = 0.0
    for start, end in spans:  # one at a time: a batch of several would round differently
        filled = torch.zeros_like(ids)
        filled[: end - start] = ids[start:end]
        alone = model(input_ids=filled[None]).logits[0, : end - start]  # [L, V]
        worst = max(worst, (packed[start:end] - alone).abs().max().item())
    model.train(was_training)
    return worst


def _read_records(path: Path) -> tuple[list[Any], list[str]]:
    """The checked records of a ``.jsonl`` file and their names (``"<path>, line <n>"``) for messages."""
    records, names = [], []
    for number, line in enumerate(decode_text(path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: invalid JSON ({err.msg}, column {err.colno}); {_EXPECTED}"
            ) from None
        names.append(f"{path}, line {number}")
    check_records(records, names, source=str(path))
    return records, names


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' is {messages!r:.60}; expected a non-empty list of {{'role', 'content'}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] is {message!r:.60}; expected an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role={message['role']!r}; allowed are {list(ROLES)}")
        _check_text(message["content"], f"{where}: messages[{i}] content")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn (roles {roles}); expected at least one, the loss is on them")
    if roles[0] == "assistant":
        raise DataError(f"{where}: the conversation opens with an assistant turn; expected a system or user turn first")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        shown = f"{value!r:.60}" if isinstance(value, str) else f"a JSON {type(value).__name__}"
        raise DataError(f"{what} is {shown}; expected a non-empty string")


def _encode_prompt_completion(record: dict[str, Any], tokenizer: Any, where: str) -> Example:
    prompt, completion = tokenizer([record["prompt"], record["completion"]], add_special_tokens=False)["input_ids"]
    answer = [*completion, tokenizer.eos_token_id]
    return Example(tuple(prompt + answer), tuple([IGNORE_INDEX] * len(prompt) + answer), where)


def _encode_messages(record: dict[str, Any], tokenizer: Any, where: str) -> Example:
    """Token ids of the whole conversation, labels on the tokens each assistant turn adds."""
    messages = record["messages"]
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    texts = [_render(tokenizer, messages, False, where)]
    for i in turns:
        texts += [_render(tokenizer, messages[:i], True, where), _render(tokenizer, messages[: i + 1], False, where)]
    full, *prefixes = tokenizer(texts, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(full)
    done = 0
    for k, i in enumerate(turns):
        before, after = prefixes[2 * k], prefixes[2 * k + 1]
        if not (done <= len(before) < len(after) and full[: len(after)] == after and after[: len(before)] == before):
            raise DataError(
                f"{where}: the chat template is not prefix-stable: the conversation up to messages[{i}] (an "
                "assistant turn) does not tokenise to a prefix of the whole conversation, so its answer tokens "
                "cannot be found; use a template that renders earlier turns unchanged, or 'prompt' / 'completion'"
            )
        labels[len(before) : len(after)] = full[len(before) : len(after)]
        done = len(after)
    return Example(tuple(full), tuple(labels), where)


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template may raise anything (jinja2 errors, its own raise_exception)
        raise DataError(f"{where}: the tokenizer's chat template failed on it: {err}") from err
    if not isinstance(text, str):
        raise DataError(f"{where}: the chat template rendered a {type(text).__name__}; expected a string")
    return text
