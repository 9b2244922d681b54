"""GGUF export's plumbing without llama.cpp: finding the converter, unpacking it, running it, reporting failures.

A stand-in ``convert_hf_to_gguf.py`` records the command line it was given (or fails the way a converter does),
and a small synthetic sdist stands for llama-cpp-python's. The real conversion is in test_gguf_export_slow.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from slimtune.app.gguf_export import (
    ENV_VAR,
    GgufExportError,
    export_gguf,
    fetch_converter,
    find_converter,
)
from slimtune.errors import ConfigError

RECORDING_CONVERTER = """
import json, sys
args = sys.argv[1:]
outfile = args[args.index("--outfile") + 1]
with open(outfile, "w") as f:
    json.dump({"argv": args, "sys_path_0": sys.path[0]}, f)
"""

FAILING_CONVERTER = """
import sys
print("INFO:hf-to-gguf:Loading model", file=sys.stderr)
print("NotImplementedError: Architecture 'FancyForCausalLM' not supported!", file=sys.stderr)
open(sys.argv[sys.argv.index("--outfile") + 1], "w").write("half")
sys.exit(3)
"""


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "merged"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    return folder


@pytest.fixture(autouse=True)
def no_converter_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "empty-cache"))


def converter_script(folder: Path, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "convert_hf_to_gguf.py"
    script.write_text(source)
    return script


def test_the_converter_runs_on_the_folder_and_its_file_is_renamed_into_place(model_folder, tmp_path):
    llama_cpp = tmp_path / "llama.cpp"
    converter_script(llama_cpp, RECORDING_CONVERTER)
    output = export_gguf(model_folder, tmp_path / "out" / "model.gguf", outtype="q8_0", converter=llama_cpp)
    assert output == tmp_path / "out" / "model.gguf"
    record = json.loads(output.read_text())
    assert record["argv"][0] == str(model_folder)
    assert record["argv"][record["argv"].index("--outtype") + 1] == "q8_0"
    assert record["sys_path_0"] == str(llama_cpp)  # run as a script: its conversion/ and gguf-py/ are found
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.gguf"]


def test_the_environment_variable_names_a_checkout(model_folder, tmp_path, monkeypatch):
    script = converter_script(tmp_path / "checkout", RECORDING_CONVERTER)
    monkeypatch.setenv(ENV_VAR, str(script.parent))
    assert find_converter() == script
    assert export_gguf(model_folder, tmp_path / "m.gguf").is_file()


def test_a_failing_converter_raises_with_its_last_lines_and_leaves_no_file(model_folder, tmp_path):
    script = converter_script(tmp_path / "llama.cpp", FAILING_CONVERTER)
    with pytest.raises(GgufExportError, match=r"exit code 3[\s\S]*Architecture 'FancyForCausalLM' not supported"):
        export_gguf(model_folder, tmp_path / "m.gguf", converter=script)
    assert not any(p.name.endswith((".gguf", ".partial")) for p in tmp_path.iterdir())


def test_no_converter_tells_how_to_get_one(model_folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"fetch_converter\(\)[\s\S]*\${ENV_VAR}"):
        export_gguf(model_folder, tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match=r"converter='.*nowhere' is not llama.cpp's converter"):
        export_gguf(model_folder, tmp_path / "m.gguf", converter=tmp_path / "nowhere")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{ENV_VAR}=.* is not llama.cpp's converter"):
        find_converter()


def test_bad_arguments_name_the_field(model_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"outtype='q4_k'.*\['f32', 'f16', 'bf16', 'q8_0'\]"):
        export_gguf(model_folder, tmp_path / "m.gguf", outtype="q4_k")
    with pytest.raises(ConfigError, match=r"merged_folder=.* does not exist"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")
    (model_folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"merged_folder=.* has no tokenizer\.json or tokenizer\.model"):
        export_gguf(model_folder, tmp_path / "m.gguf")


def add_file(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_fetch_converter_unpacks_only_the_converter_from_an_sdist(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        top = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        add_file(tar, top + "convert_hf_to_gguf.py", RECORDING_CONVERTER)
        add_file(tar, top + "conversion/__init__.py", "")
        add_file(tar, top + "gguf-py/gguf/__init__.py", "")
        add_file(tar, top + "src/llama.cpp", "int main() {}")
        add_file(tar, "llama_cpp_python-0.3.36/llama_cpp/__init__.py", "")
    script = fetch_converter(cache_dir=tmp_path / "cache", sdist=sdist)
    assert script == find_converter(cache_dir=tmp_path / "cache")
    unpacked = sorted(str(p.relative_to(script.parent)) for p in script.parent.rglob("*") if p.is_file())
    assert unpacked == [
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
        "slimtune-cache.json",
    ]

    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        add_file(tar, "pkg-1.0/setup.py", "")
    with pytest.raises(GgufExportError, match=r"holds no vendor/llama\.cpp/convert_hf_to_gguf\.py"):
        fetch_converter(cache_dir=tmp_path / "cache2", sdist=other)
    assert not (tmp_path / "cache2" / "llama.cpp-0.3.36").exists()
