"""A merged SmolLM2 fine-tune exported to GGUF by llama.cpp's converter generates in llama.cpp what it does in
transformers (about 1.5 min on 2 cores; needs llama-cpp-python, built from source, and the converter).

The merged model is SmolLM2-135M with a LoRA on every attention and MLP projection, its factors set at random so
that the merge moves the weights (the logits move by more than the f16 export's error), saved in float16 so that
transformers and llama.cpp read the same weights. Both decode greedily, one argmax per step, from the same token
ids (the prompt is tokenised once, by the Hugging Face tokenizer, so tokenizers cannot differ).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import slimtune as st
from cases import randomize_adapters
from slimtune.app.gguf_export import GgufExportError, export_gguf, fetch_converter, find_converter
from slimtune.app.models import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, imported only when a slow test runs (so the default suite neither needs nor skips it)."""
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (`make test-slow` builds llama-cpp-python==0.3.36)"
    )


PROMPTS = ("The capital of France is", "Shares in the mobile phone maker rose sharply on Monday after")
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def converter():
    try:
        return find_converter()
    except FileNotFoundError:
        return fetch_converter()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(folder of the merged fine-tune in float16, its tokenizer, the base model in float32)."""
    base, tokenizer = load_smollm2(dtype=torch.float32)
    adapted = st.get_adapted_model(load_smollm2(dtype=torch.float32)[0], st.LoraConfig(r=8, alpha=16.0))
    randomize_adapters(adapted, scale=0.05)
    folder = tmp_path_factory.mktemp("merged")
    st.merge_and_unload(adapted).to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer, base


def hf_greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """NEW_TOKENS argmax steps of a transformers model (with its KV cache) and the first step's logits [V]."""
    generated, first, past, step = [], None, None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model(step, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]  # [V]
            first = logits.numpy() if first is None else first
            generated.append(int(logits.argmax()))
            step = torch.tensor([[generated[-1]]])
    return generated, first


def llama_greedy(llm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """NEW_TOKENS argmax steps of llama.cpp from the token ids ``ids``, and the first step's logits [V]."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    generated = []
    for _ in range(NEW_TOKENS):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([generated[-1]])
    return generated, first


def test_an_f16_export_decodes_the_same_tokens_as_transformers_and_q8_0_starts_alike(
    merged, converter, llama_cpp, tmp_path
):
    folder, tokenizer, base = merged
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    start = time.perf_counter()
    references = [hf_greedy(hf, ids) for ids in prompts]
    report: dict[str, float] = {"hf_greedy_s": round(time.perf_counter() - start, 1)}
    with torch.no_grad():
        shifts = [
            float(np.abs(base(torch.tensor([ids])).logits[0, -1].numpy() - ref[1]).max())
            for ids, ref in zip(prompts, references)
        ]
    report["merge_logit_shift"] = min(shifts)
    for outtype in ("f16", "q8_0"):
        start = time.perf_counter()
        path = export_gguf(folder, tmp_path / f"merged-{outtype}.gguf", outtype=outtype, converter=converter)
        report[f"{outtype}_convert_s"] = round(time.perf_counter() - start, 1)
        report[f"{outtype}_MiB"] = path.stat().st_size >> 20
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
        start = time.perf_counter()
        runs = [llama_greedy(llm, ids) for ids in prompts]
        report[f"{outtype}_llama_greedy_s"] = round(time.perf_counter() - start, 1)
        report[f"{outtype}_matching"] = [
            sum(a == b for a, b in zip(run[0], ref[0])) for run, ref in zip(runs, references)
        ]
        report[f"{outtype}_max_logit_error"] = max(
            float(np.abs(run[1] - ref[1]).max()) for run, ref in zip(runs, references)
        )
        report[f"{outtype}_same_first_token"] = all(run[0][0] == ref[0][0] for run, ref in zip(runs, references))
    print(report)
    assert report["f16_matching"] == [NEW_TOKENS] * len(PROMPTS), report
    assert report["f16_max_logit_error"] < report["merge_logit_shift"] / 10, report  # the merge is in the file
    assert report["q8_0_same_first_token"] and report["q8_0_max_logit_error"] < report["merge_logit_shift"] / 2, report


def test_a_folder_the_converter_cannot_read_fails_with_its_message(converter, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}')
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(GgufExportError, match=r"failed with exit code[\s\S]*NoSuchModelForCausalLM is not supported"):
        export_gguf(folder, tmp_path / "broken.gguf", converter=converter)
    assert not (tmp_path / "broken.gguf").exists()
