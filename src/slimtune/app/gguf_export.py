"""A merged Hugging Face model folder written out as GGUF by llama.cpp's own converter.

slimtune does not rewrite the conversion: it runs llama.cpp's ``convert_hf_to_gguf.py`` in a subprocess (the
same Python as this process) on a plain folder such as ``slimtune merge --output DIR`` writes (config,
safetensors and tokenizer), and the resulting file loads in llama.cpp, llama-cpp-python, Ollama or LM Studio.

The converter is not in the ``gguf`` wheel. :func:`find_converter` looks, in this order, for

1. the ``converter`` argument: the script itself, or a llama.cpp checkout holding it;
2. ``$SLIMTUNE_LLAMA_CPP``: a llama.cpp checkout;
3. the slimtune cache (``<cache root>/llama.cpp-<version>``), filled once by :func:`fetch_converter` from the
   llama-cpp-python source distribution, which vendors llama.cpp (``pip download`` of 75 MB; the script, its
   ``conversion`` package and its ``gguf-py`` are unpacked, about 4 MB).

The converter imports torch, transformers, numpy and ``sentencepiece`` (the last for every Llama-family model,
even one with a ``tokenizer.json`` only), and uses the ``gguf-py`` beside it before an installed ``gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from slimtune.app.models import cache_root, ensure_cache
from slimtune.errors import ConfigError, SlimtuneError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
SCRIPT = "convert_hf_to_gguf.py"
ENV_VAR = "SLIMTUNE_LLAMA_CPP"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SENTENCEPIECE_REQUIREMENT = "sentencepiece==0.2.3"
# What the converter needs from llama.cpp's tree (paths inside it); LICENSE travels with the code.
_CONVERTER_PARTS = (SCRIPT, "conversion", "gguf-py", "LICENSE")
_STDERR_LINES = 15
_HOW_TO_GET = (
    f"get it with `python -c 'from slimtune.app.gguf_export import fetch_converter; fetch_converter()'` (downloads "
    f"the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} source distribution and unpacks the converter into the "
    f"slimtune cache), or clone llama.cpp and set ${ENV_VAR} to the checkout"
)


class GgufExportError(SlimtuneError, RuntimeError):
    """llama.cpp's converter, or the download of it, ran and failed (the message ends with its last output)."""


def export_gguf(
    merged_folder: str | os.PathLike,
    output_file: str | os.PathLike,
    outtype: str = "f16",
    converter: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> Path:
    """Convert the Hugging Face model folder ``merged_folder`` into the GGUF file ``output_file``; returns its path.

    ``outtype`` is the type of the large weight matrices: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``
    (8-bit blocks of 32 with one scale; norms and other vectors stay f32). The file is written beside
    ``output_file`` under a temporary name and renamed into place, so a failed run leaves no partial file.
    SmolLM2-135M converts in about 10 s on 2 cores.

    Raises:
        ConfigError: ``outtype`` is not one of :data:`OUTTYPES`, or ``merged_folder`` is no model folder
            (no ``config.json``, no safetensors / bin weights, or no tokenizer files).
        FileNotFoundError: no converter found (the message has the commands that get one).
        ModuleNotFoundError: ``sentencepiece``, which the converter imports, is not installed.
        GgufExportError: the converter failed or timed out (the message ends with the last lines it printed).
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype={outtype!r} is not allowed: expected one of {list(OUTTYPES)}")
    folder = Path(merged_folder).expanduser()
    _check_model_folder(folder)
    script = find_converter(converter)
    if importlib.util.find_spec("sentencepiece") is None:
        raise ModuleNotFoundError(
            f"llama.cpp's converter imports sentencepiece, which is not installed; install it with "
            f"`pip install {SENTENCEPIECE_REQUIREMENT}`",
            name="sentencepiece",
        )
    output = Path(output_file).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    command = [sys.executable, str(script), str(folder), "--outfile", str(partial), "--outtype", outtype]
    try:
        _run(command, timeout, what=f"llama.cpp's converter ({script})")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def find_converter(converter: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``convert_hf_to_gguf.py``: from ``converter``, else ``$SLIMTUNE_LLAMA_CPP``, else the cache.

    ``converter`` and ``$SLIMTUNE_LLAMA_CPP`` may name the script or the llama.cpp folder that holds it; the cache
    is ``<cache_root(cache_dir)>/llama.cpp-<LLAMA_CPP_PYTHON_VERSION>`` as :func:`fetch_converter` fills it.

    Raises:
        FileNotFoundError: the named path holds no converter, or none was named and the cache has none.
    """
    for source, value in (("converter", converter), (ENV_VAR, os.environ.get(ENV_VAR) or None)):
        if value is not None:
            path = Path(value).expanduser()
            script = path / SCRIPT if path.is_dir() else path
            if script.is_file() and script.name == SCRIPT:
                return script.absolute()
            raise FileNotFoundError(
                f"{source}={str(value)!r} is not llama.cpp's converter: expected {SCRIPT} or a llama.cpp "
                f"checkout holding it; {_HOW_TO_GET}"
            )
    script = converter_cache_folder(cache_dir) / SCRIPT
    if script.is_file():
        return script
    raise FileNotFoundError(f"llama.cpp's converter ({SCRIPT}) was not found in {script.parent}; {_HOW_TO_GET}")


def converter_cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`fetch_converter` unpacks the converter: ``<cache_root(cache_dir)>/llama.cpp-<version>``."""
    return cache_root(cache_dir) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def fetch_converter(
    cache_dir: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None, timeout: float | None = 600.0
) -> Path:
    """Unpack llama.cpp's converter from the llama-cpp-python source distribution into the cache; returns the script.

    ``sdist`` is a downloaded ``llama_cpp_python-<version>.tar.gz``; without it, ``pip download --no-binary :all:
    --no-deps llama-cpp-python==<version>`` fetches one into a temporary folder (75 MB, deleted afterwards). Only
    the converter, its ``conversion`` package, ``gguf-py`` and the licence are unpacked. A complete cache is kept
    and returned at once; the folder is filled under a temporary name and renamed, so it is never half-written.

    Raises:
        FileNotFoundError: ``sdist`` does not exist.
        GgufExportError: pip failed, or the archive holds no converter.
    """
    folder = converter_cache_folder(cache_dir)
    if sdist is not None and not Path(sdist).expanduser().is_file():
        raise FileNotFoundError(f"sdist={str(sdist)!r} does not exist; {_HOW_TO_GET}")

    def build(tmp: Path) -> None:
        if sdist is not None:
            _unpack_converter(Path(sdist).expanduser(), tmp)
            return
        with tempfile.TemporaryDirectory(prefix="slimtune-sdist-") as download:
            _run(_pip_download_command(download), timeout, what="pip download of llama-cpp-python")
            archives = sorted(Path(download).glob("*.tar.gz"))
            if not archives:
                raise GgufExportError(f"pip download left no .tar.gz source distribution in {download}")
            _unpack_converter(archives[0], tmp)

    ensure_cache(folder, build)
    return folder / SCRIPT


def _pip_download_command(destination: str) -> list[str]:
    requirement = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        requirement,
        "-d",
        destination,
    ]


def _unpack_converter(archive: Path, destination: Path) -> None:
    """Extract the converter's parts from ``<top>/vendor/llama.cpp/`` of ``archive`` into ``destination``."""
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in _CONVERTER_PARTS:
                member.name = str(Path(*parts[3:]))
                members.append(member)
        if not any(m.name == SCRIPT for m in members):
            raise GgufExportError(f"{archive} holds no vendor/llama.cpp/{SCRIPT}: not a llama-cpp-python sdist")
        tar.extractall(destination, members=members, filter="data")


def _check_model_folder(folder: Path) -> None:
    """Raise a ConfigError unless ``folder`` has a config, weights and tokenizer files."""
    problem = None
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is a file"
    elif not (folder / "config.json").is_file():
        problem = "has no config.json"
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        problem = "has no *.safetensors or *.bin weights"
    elif not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        problem = "has no tokenizer.json or tokenizer.model (save the tokenizer beside the model)"
    if problem is not None:
        raise ConfigError(
            f"merged_folder={str(folder)!r} is not allowed: it {problem}; expected a Hugging Face model folder "
            "with its tokenizer, such as `slimtune merge --output DIR` writes"
        )


def _run(command: list[str], timeout: float | None, what: str) -> None:
    """Run ``command``; on failure or timeout raise GgufExportError with its last lines of output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise GgufExportError(
            f"{what} did not finish within timeout={timeout} s; command: {' '.join(command)}"
            f"{_tail(_text(error.stderr) or _text(error.stdout))}"
        ) from None
    if done.returncode != 0:
        raise GgufExportError(
            f"{what} failed with exit code {done.returncode} after {time.perf_counter() - start:.1f} s; "
            f"command: {' '.join(command)}{_tail(done.stderr or done.stdout)}"
        )


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode("utf-8", "replace") if isinstance(output, bytes) else output


def _tail(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()][-_STDERR_LINES:]
    return "\nlast lines of its output:\n" + "\n".join(lines) if lines else ""
