"""The architecture as tests: core <- training <- app, imports one way only, and a core that needs only torch.

Layers: the core is ``slimtune`` and every subpackage but ``training`` and ``app`` (``__main__`` is the command
line's entry point, so it belongs to the app); ``slimtune.training`` may import the core; ``slimtune.app`` may
import both. Checked twice: statically, on every ``import`` statement of every source file (function-level
imports included), and at run time, on what importing each layer actually loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "slimtune"
RANK = {"core": 0, "training": 1, "app": 2}
# What the core may need at import time: torch and safetensors (torch itself pulls in numpy and tqdm when present).
NOT_CORE = ("transformers", "accelerate", "scipy", "matplotlib", "gguf", "peft", "datasets", "tokenizers")


def layer_of(module: str) -> str:
    """'core', 'training' or 'app' for a dotted slimtune module name."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("training", "app"):
        return parts[1]
    return "app" if parts[1:2] == ["__main__"] else "core"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every slimtune module a source file imports, wherever the import statement stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("slimtune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimtune"):
            found.append((node.lineno, node.module))
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                for alias in node.names
                if (PACKAGE.parent / node.module.replace(".", "/") / alias.name).is_dir()
            ]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_partition_the_package():
    layers = {layer_of(module_name(path)) for path in SOURCES}
    assert layers == set(RANK)
    assert layer_of("slimtune.linear_attention.convert") == "core"
    assert layer_of("slimtune.training.loop") == "training" and layer_of("slimtune.app.cli") == "app"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {module}" for line, module in imported_modules(path) if RANK[layer_of(module)] > RANK[own]]
    assert not upward, f"{module_name(path)} ({own}) imports a higher layer: {upward}"


def loaded_by(statement: str) -> dict[str, list[str]]:
    """The slimtune modules and the third-party top-level packages loaded by running ``statement`` fresh."""
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps({'slimtune': sorted(m for m in sys.modules if m.startswith('slimtune')), "
        "'packages': sorted({m.split('.')[0] for m in sys.modules})}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_slimtune_loads_only_the_core_and_torch():
    loaded = loaded_by("import slimtune")
    assert {layer_of(m) for m in loaded["slimtune"]} == {"core"}, loaded["slimtune"]
    assert not set(loaded["packages"]) & set(NOT_CORE), sorted(set(loaded["packages"]) & set(NOT_CORE))


def test_importing_training_loads_no_app_module():
    loaded = loaded_by("import slimtune.training")
    assert "app" not in {layer_of(m) for m in loaded["slimtune"]}, loaded["slimtune"]
    assert "slimtune.training.loop" in loaded["slimtune"]


def test_importing_linear_attention_loads_no_training_or_app_module():
    loaded = loaded_by("import slimtune.linear_attention")
    assert {layer_of(m) for m in loaded["slimtune"]} == {"core"}, loaded["slimtune"]


def test_the_core_requires_only_torch_and_safetensors_and_extras_are_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [requirement.split(">")[0].split("<")[0].split("=")[0].strip() for requirement in project["dependencies"]]
    assert names == ["torch", "safetensors"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pinned = [r for r in requirements if "==" in r]
    assert not pinned, f"exact pins belong in constraints.txt, not the library's requirements: {pinned}"
    assert {"linear", "train", "app", "test", "lint"} <= set(project["optional-dependencies"])


def test_the_constraints_pin_every_package_exactly_with_the_cpu_torch():
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in lines), [line for line in lines if "==" not in line]
    assert "torch==2.13.0" in lines


@pytest.mark.slow
def test_the_core_alone_installs_in_a_fresh_venv_and_imports(tmp_path):
    """pip installs slimtune without extras next to the CPU torch; `import slimtune` adapts and merges a layer."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, str(ROOT)], check=True)
    code = (
        "import torch, slimtune as st, importlib.util as u; "
        "m = st.get_adapted_model(torch.nn.Sequential(torch.nn.Linear(6, 4)), st.DishaConfig(r=2)); "
        "st.merge_and_unload(m); "
        "print([n for n in ('transformers', 'accelerate', 'scipy') if u.find_spec(n)])"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
