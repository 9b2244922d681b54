"""The method matrix, tiny models and the slow references shared by the tests.

Every method and variant appears once in ``CASES``; the shared tests in ``test_adapter_matrix.py`` run each
through the same checks. Layer sizes are not powers of two, and ``bone_padded`` has r not dividing d_in.

The references (``reference_delta``, ``reference_merged``, ``reference_output``) compute each case from its
paper's definition, apart from slimtune's code: explicit loops, einsum, ``scipy.linalg`` and ``torch.kron`` over
the adapter's parameters, read by the names its saved files use. They are differentiable, for gradient checks.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

import slimtune as st

OUTPUT_LAYERS = r".*(fc\d|o_proj|down_proj|c_proj)"  # MLP, Llama and GPT-2 layers whose output is adapted

CASES: dict[str, st.AdapterConfig] = {
    "lora": st.LoraConfig(r=4, alpha=8.0),
    "lora_rslora": st.LoraConfig(r=4, alpha=8.0, use_rslora=True),
    "bone": st.DishaConfig(r=6),
    "bone_padded": st.DishaConfig(r=4),
    "mini": st.DishaConfig(r=6, variant="mini", mini_r=3),
    "bat_col": st.DishaConfig(r=6, variant="bat_col"),
    "bat_row": st.DishaConfig(r=6, variant="bat_row"),
    "lora_sp": st.LoraSpConfig(r=4, alpha=8.0),
    "lora_sp_rank": st.LoraSpConfig(r=4, alpha=8.0, granularity="rank", freeze_fraction=0.25),
    "surm_circulant": st.SurmConfig(structure="circulant", block_size=6),
    "surm_circulant_gcd": st.SurmConfig(structure="circulant"),
    "surm_toeplitz": st.SurmConfig(structure="toeplitz", block_size=6),
    "surm_toeplitz_symmetric": st.SurmConfig(structure="toeplitz_symmetric", block_size=3),
    "surm_toeplitz_product": st.SurmConfig(structure="toeplitz_product", block_size=6),
    "surm_kronecker": st.SurmConfig(structure="kronecker", r=6),
    "surm_ldr": st.SurmConfig(structure="ldr", block_size=6, displacement_rank=2),
    "surm_adapter": st.SurmAdapterConfig(structure="circulant", block_size=6, target_modules=OUTPUT_LAYERS),
    "surm_adapter_gelu": st.SurmAdapterConfig(
        structure="ldr", block_size=3, activation="gelu", target_modules=OUTPUT_LAYERS
    ),
    "bottleneck": st.BottleneckConfig(r=5, activation="gelu", target_modules=OUTPUT_LAYERS),
    "bottleneck_silu_no_bias": st.BottleneckConfig(
        r=3, activation="silu", bias=False, scaling=0.5, target_modules=OUTPUT_LAYERS
    ),
}


class TinyMLP(nn.Module):
    """30 → 42 → 18 with biases: no dimension is a power of two; 4 divides none of 30, 42."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 42)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(42, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype)


# The size every tiny decoder of the tests shares: hidden 48, 4 heads, MLP 72, 2 layers, vocabulary 101.
TINY_DECODER = {
    "vocab_size": 101,
    "hidden_size": 48,
    "intermediate_size": 72,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    """A LlamaForCausalLM (2 layers unless told) from a config: hidden 48, GQA 4/2 heads (k/v 48 → 24), MLP 72,
    vocab 101."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**TINY_DECODER, "num_hidden_layers": layers}, num_key_value_heads=2, tie_word_embeddings=False
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT2LMHeadModel (Conv1D layers): n_embd 36, 3 heads, c_attn 36 → 108, MLP 36 → 144, vocab 101."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=36, n_layer=2, n_head=3)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(num_labels: int = 3, seed: int = 0, init_std: float = 0.02) -> nn.Module:
    """A 2-layer BertForSequenceClassification from a config: hidden 24, 2 heads, MLP 36, vocab 101, head
    ``classifier`` (24 → ``num_labels``); ``init_std`` is the weights' initializer range."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=101,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=36,
        max_position_embeddings=64,
        num_labels=num_labels,
        initializer_range=init_std,
    )
    return BertForSequenceClassification(config).eval()


def perturbed_conversion(model: nn.Module, config: Any) -> nn.Module:
    """``model`` linearised with ``config`` (a LinearizeConfig), in eval mode (no dropout), its added parameters
    moved off their initial values by seeded noise (× 0.1)."""
    from slimtune.linear_attention import linear_attention_parameters, linearize

    converted = linearize(model, config).eval()
    with torch.no_grad():
        for i, p in enumerate(linear_attention_parameters(converted)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return converted


@torch.no_grad()
def greedy_by_full_forwards(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``prompt`` [B, T] followed by ``new_tokens`` greedy tokens, each from a full forward without cache:
    the reference ``generate`` must reproduce. Returns [B, T + new_tokens]."""
    ids = prompt
    for _ in range(new_tokens):
        next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


def model_input(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyMLP):
        return {"x": torch.randn(3, 5, 30, generator=generator, dtype=next(model.parameters()).dtype)}
    return {"input_ids": torch.randint(0, 101, (2, 11), generator=generator)}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(kind: str, seed: int = 0) -> nn.Module:
    return {"mlp": tiny_mlp, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind](seed)


def adapted_copy(model: nn.Module, config: st.AdapterConfig, name: str = "default") -> nn.Module:
    return st.get_adapted_model(copy.deepcopy(model), config, name)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a failed injection or load must not change: weights, module types, requires_grad, adapters."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {name: type(module) for name, module in model.named_modules()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "configs": st.adapter_configs(model),
        "active": st.active_adapters(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is as :func:`snapshot` saw it."""
    after = snapshot(model)
    assert after["types"] == before["types"] and after["grad"] == before["grad"]
    assert after["configs"] == before["configs"] and after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def randomize_adapters(model: nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    """Give every adapter parameter random values (adapters start at an identity; this makes them do something)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in st.adapted_layers(model):
            for param in layer.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def tensor(adapter: nn.Module, name: str) -> torch.Tensor:
    """The adapter's tensor called ``name`` (e.g. ``"operator.c_a"``), whatever tensor sits there now."""
    return operator.attrgetter(name)(adapter)


def reference_delta(config: st.AdapterConfig, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """ΔW (d_out, d_in) of ``adapter`` (built from ``config``) on base weight ``weight`` (d_out, d_in), its dtype."""
    dtype = weight.dtype
    if isinstance(config, st.LoraConfig):
        a, b = lora_factors(config, adapter)
        scale = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        return scale * torch.einsum("ok,ki->oi", b.to(dtype), a.to(dtype))  # s·Σ_k B[o, k]·A[k, i]
    if isinstance(config, st.SurmAdapterConfig):
        return structured_reference(config, adapter, dtype) @ weight
    if isinstance(config, st.SurmConfig):
        return structured_reference(config, adapter, dtype)
    if isinstance(config, st.DishaConfig):
        block = tensor(adapter, "block").to(dtype)
        d_out, d_in = weight.shape
        if config.variant == "bone":
            return bone_delta_reference(block, d_in)
        if config.variant == "mini":
            return mini_delta_reference(block, d_in, d_out)
        return bat_delta_reference(weight, block, config.variant)
    raise AssertionError(f"no reference for {type(config).__name__}")


def reference_merged(
    config: st.AdapterConfig, adapter: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of the layer with ``adapter`` merged, from the references (affine adapters only)."""
    if isinstance(config, st.SurmAdapterConfig):  # out = (I + M) h + bias
        m = structured_reference(config, adapter, weight.dtype)
        base_bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        extra = tensor(adapter, "bias").to(weight.dtype) if config.bias else 0
        return weight + m @ weight, base_bias + m @ base_bias + extra
    return weight + reference_delta(config, adapter, weight), bias


REFERENCE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda v: v,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def reference_output(
    config: st.AdapterConfig, adapter: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The adapted layer's output from the references: (..., d_in) → (..., d_out)."""
    if isinstance(config, st.BottleneckConfig):
        return bottleneck_reference(config, adapter, F.linear(x, weight, bias))
    if isinstance(config, st.SurmAdapterConfig):  # out = h + act(α·M h) + bias
        h = F.linear(x, weight, bias)
        m = structured_reference(config, adapter, x.dtype)
        out = h + REFERENCE_ACTIVATIONS[config.activation](torch.einsum("rs,...s->...r", m, h))
        return out + tensor(adapter, "bias").to(x.dtype) if config.bias else out
    return F.linear(x, *reference_merged(config, adapter, weight, bias))


def bottleneck_reference(config: st.BottleneckConfig, adapter: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Houlsby's adapter on h (..., d_out): h + s·(W_up·act(W_down·h + b_down) + b_up), einsum on saved names."""

    def param(name: str) -> torch.Tensor:
        return tensor(adapter, name).to(h.dtype)

    z = torch.einsum("kd,...d->...k", param("down.weight"), h)  # Σ_d W_down[k, d]·h[d]
    z = z + param("down.bias") if config.bias else z
    up = torch.einsum("dk,...k->...d", param("up.weight"), REFERENCE_ACTIVATIONS[config.activation](z))
    up = up + param("up.bias") if config.bias else up
    return h + config.scaling * up


def lora_factors(config: st.LoraConfig, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)); LoRA-SP's from its masks, trainable values and frozen initial A."""
    if not isinstance(config, st.LoraSpConfig):
        return tensor(adapter, "lora_A"), tensor(adapter, "lora_B")
    values_a, values_b = tensor(adapter, "lora_A_values"), tensor(adapter, "lora_B_values")
    mask_a, mask_b = tensor(adapter, "lora_A_mask"), tensor(adapter, "lora_B_mask")
    a = scatter_reference(tensor(adapter, "lora_A_frozen"), mask_a, values_a)
    return a, scatter_reference(torch.zeros(mask_b.shape, dtype=values_b.dtype), mask_b, values_b)


def scatter_reference(frozen: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The dense factor entry by entry: trainable values in row-major order of the mask, frozen values elsewhere."""
    entries, k = [], 0
    for position in range(mask.numel()):
        if mask.flatten()[position]:
            entries.append(values[k])
            k += 1
        else:
            entries.append(frozen.flatten()[position].to(values.dtype))
    return torch.stack(entries).view(mask.shape)


def bone_delta_reference(m: torch.Tensor, d_in: int) -> torch.Tensor:
    """Bone ΔW[o, i] = M[i mod r, o], column by column: m (r, d_out) → (d_out, d_in)."""
    return torch.stack([m[i % m.shape[0]] for i in range(d_in)], dim=1)


def mini_delta_reference(m: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """mini ΔW[o, i] = m[i mod r, o mod mini_r] through index tables: m (r, mini_r) → (d_out, d_in)."""
    r, mini_r = m.shape
    rows = torch.tensor([[i % r for i in range(d_in)] for _ in range(d_out)])
    cols = torch.tensor([[o % mini_r for _ in range(d_in)] for o in range(d_out)])
    return m[rows, cols]


def bat_delta_reference(weight: torch.Tensor, b: torch.Tensor, variant: str) -> torch.Tensor:
    """Bat ΔW_ij = W_ij·B_k + B_k block by block, k = i (``bat_col``) or j (``bat_row``): → (d_out, d_in)."""
    r = b.shape[-1]

    def block(i: int, j: int) -> torch.Tensor:
        k = i if variant == "bat_col" else j
        return weight[i * r : (i + 1) * r, j * r : (j + 1) * r] @ b[k] + b[k]

    return block_grid(block, weight.shape[0] // r, weight.shape[1] // r)


def block_grid(block: Callable[[int, int], torch.Tensor], p: int, q: int) -> torch.Tensor:
    """The matrix with block (i, j) = block(i, j) for a p × q grid of equal blocks."""
    return torch.cat([torch.cat([block(i, j) for j in range(q)], dim=1) for i in range(p)], dim=0)


def general_toeplitz(t: np.ndarray) -> np.ndarray:
    """T(t)[r, s] = t[r − s + b − 1] for t of length 2b − 1: first column t[b−1:], first row t[b−1], …, t[0]."""
    b = (len(t) + 1) // 2
    return scipy.linalg.toeplitz(t[b - 1 :], t[b - 1 :: -1])


def circulant_by_loops(c: np.ndarray) -> np.ndarray:
    """Circ(c)[r, s] = c[(r − s) mod b]."""
    b = len(c)
    return np.array([[c[(r - s) % b] for s in range(b)] for r in range(b)])


def skew_circulant_by_loops(h: np.ndarray) -> np.ndarray:
    """SkewCirc(h)[r, s] = h[r − s] if r ≥ s else −h[r − s + b]."""
    b = len(h)
    return np.array([[h[r - s] if r >= s else -h[r - s + b] for s in range(b)] for r in range(b)])


@functools.cache
def _basis(build: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    return np.stack([build(e) for e in np.eye(n)])  # (n, b, b): build(e_k)


def linear_matrix(values: torch.Tensor, build: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """build(values) for a ``build`` linear in its argument, differentiably: Σ_k values[k]·build(e_k)."""
    basis = torch.from_numpy(_basis(build, values.shape[-1])).to(values.dtype)
    return torch.einsum("k,krs->rs", values, basis)


STRUCTURE_BLOCKS: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {
    "circulant": (("c_a", "c_b"), lambda a, b: linear_matrix(b * a, scipy.linalg.circulant)),
    "toeplitz": (("t",), lambda t: linear_matrix(t, general_toeplitz)),
    "toeplitz_symmetric": (("t",), lambda t: linear_matrix(t, scipy.linalg.toeplitz)),
    "toeplitz_product": (
        ("u", "w"),
        lambda u, w: linear_matrix(u, scipy.linalg.toeplitz) @ linear_matrix(w, scipy.linalg.toeplitz),
    ),
    "ldr": (("c", "h"), lambda c, h: sum(ldr_term(c_k, h_k) for c_k, h_k in zip(c, h))),  # Σ over K
}


def ldr_term(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Circ(c)·SkewCirc(h) for c, h (b,), both by loops over the definitions."""
    return linear_matrix(c, circulant_by_loops) @ linear_matrix(h, skew_circulant_by_loops)


def structured_reference(config: st.SurmConfig, adapter: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """SURM's M (d_out, d_in), scale included: kron(B, A)·α/r, or the grid of per-block structured matrices·α."""

    def param(name: str) -> torch.Tensor:
        return tensor(adapter, f"operator.{name}").to(dtype)

    if config.structure == "kronecker":
        return config.alpha / config.r * torch.kron(param("kron_b"), param("kron_a"))
    names, block = STRUCTURE_BLOCKS[config.structure]
    params = [param(name) for name in names]  # each (p, q, ...)
    p, q = params[0].shape[:2]
    return config.alpha * block_grid(lambda i, j: block(*(t[i, j] for t in params)), p, q)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
