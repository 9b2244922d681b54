"""Slow study on the real model (``make test-slow``): every adapter trains SmolLM2-135M in bfloat16 for 50 steps
and loss, gradients and weights stay finite. The same run with a table and a JSON record is
``benchmarks/bf16_stability.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import slimtune as st

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from bf16_stability import configs, run

STEPS = 50


@pytest.fixture(scope="module")
def smollm2_bf16():
    from slimtune.app.corpus import lm_blocks
    from slimtune.app.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.bfloat16)
    return model, lm_blocks(tokenizer, "train", seq_len=64, max_blocks=STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(configs()))
def test_every_adapter_stays_finite_for_50_bfloat16_steps(smollm2_bf16, method):
    base, blocks = smollm2_bf16
    config, lr = configs()[method]
    torch.manual_seed(0)
    adapted = st.get_adapted_model(copy.deepcopy(base), config).to(torch.bfloat16)  # adapters default to float32
    result = run(adapted, blocks, lr, STEPS)
    assert result["param_dtypes"] == ["torch.bfloat16"]
    assert result["finite_steps"] == STEPS
