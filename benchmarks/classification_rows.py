"""The rows of ``benchmarks/classification.py``: each method's adapter config and learning-rate sweep.

MiniLM (all-MiniLM-L6-v2: 6 layers, d=384, FFN 1536) with its new head ``classifier`` (384 → 5). Every adapter row
saves the head (``modules_to_save``), so the head trains with the adapter. Trainable parameters on MiniLM, head
(1,925) included: LoRA r=2 86,405; LoRA r=8, LoRA-SP r=16 half frozen, Bone r=16 and Bat-Row r=16 339,845 each (LoRA
and Bone equal here); SURM circulant / Toeplitz (one block per layer, b = gcd) 57,989 / 57,916; SURM Kronecker
44,165 (d_in + d_out per layer whatever r); SURM LDR (K=1, b=192: 2bK per block) 114,053. The output adapters sit
after the attention-output and FFN-output projections (``.*output\\.dense``, Houlsby's placement, 12 layers): SURM
adapter circulant / Toeplitz / LDR (K=1, b=192) 15,749 / 15,737 / 24,965; bottleneck r=2 24,989 (the SURM adapters'
size) and r=16 154,181 (9.8x the circulant adapter: the reference of the 1/8 target). The study records the counts
it measures. LDR uses b = 192 and K = 1 rather than b = 384 and K = 2: the same parameters, half the step time (at b
= 384 each step forms the whole ΔW, p·q·K·b³ work).

Sweeps (the head trains at the row's rate): LoRA-like, DiSHA and bottleneck rows 1e-3 .. 1e-2; SURM rows
1e-3 .. 1e-1 (structured updates want much higher rates, as PEFT's C3A benchmark at lr ≈ 0.3); the linear probe
1e-2 .. 1e-1; full fine-tuning 1e-4 .. 1e-3. A first run with every grid a third to a tenth lower had LoRA's,
LoRA-SP's, the probe's and full fine-tuning's best rate at the top of its grid, so the grids were moved up.
"""

from __future__ import annotations

import dataclasses

import slimtune as st

HEAD = "classifier"
DECODER_HEAD = "score"
OUTPUT_LAYERS = r".*output\.dense"
ADAPTER_LRS = (1e-3, 3e-3, 1e-2)
SURM_LRS = (1e-3, 1e-2, 1e-1)
STEPS_BY_K = {8: 25, 32: 40, 128: 60}
QUICK_ROWS = ("head_only", "lora_r8", "surm_adapter_circulant")


@dataclasses.dataclass(frozen=True)
class Row:
    """One method of the study: ``config`` None with ``name`` "head_only" (only the head trains) or "full" (all)."""

    name: str
    config: st.AdapterConfig | None
    lrs: tuple[float, ...]


def minilm_rows() -> dict[str, Row]:
    """The MiniLM rows, in table order."""
    head = [HEAD]

    def surm_adapter(structure: str, **fields: int) -> st.SurmAdapterConfig:
        return st.SurmAdapterConfig(
            structure=structure, activation="identity", target_modules=OUTPUT_LAYERS, modules_to_save=head, **fields
        )

    def bottleneck(r: int) -> st.BottleneckConfig:
        return st.BottleneckConfig(r=r, activation="relu", target_modules=OUTPUT_LAYERS, modules_to_save=head)

    rows = [
        Row("head_only", None, (1e-2, 3e-2, 1e-1)),
        Row("full", None, (1e-4, 3e-4, 1e-3)),
        Row("lora_r2", st.LoraConfig(r=2, alpha=4.0, modules_to_save=head), ADAPTER_LRS),
        Row("lora_r8", st.LoraConfig(r=8, alpha=16.0, modules_to_save=head), ADAPTER_LRS),
        Row("lora_sp", st.LoraSpConfig(r=16, alpha=32.0, freeze_fraction=0.5, modules_to_save=head), ADAPTER_LRS),
        Row("bone", st.DishaConfig(r=16, variant="bone", modules_to_save=head), ADAPTER_LRS),
        Row("bat_row", st.DishaConfig(r=16, variant="bat_row", modules_to_save=head), ADAPTER_LRS),
        Row("surm_circulant", st.SurmConfig(structure="circulant", modules_to_save=head), SURM_LRS),
        Row("surm_toeplitz", st.SurmConfig(structure="toeplitz", modules_to_save=head), SURM_LRS),
        Row("surm_kronecker", st.SurmConfig(structure="kronecker", r=16, modules_to_save=head), SURM_LRS),
        Row("surm_ldr", st.SurmConfig(structure="ldr", block_size=192, modules_to_save=head), SURM_LRS),
        Row("surm_adapter_circulant", surm_adapter("circulant"), SURM_LRS),
        Row("surm_adapter_toeplitz", surm_adapter("toeplitz"), SURM_LRS),
        Row("surm_adapter_ldr", surm_adapter("ldr", block_size=192), SURM_LRS),
        Row("bottleneck_r2", bottleneck(2), ADAPTER_LRS),
        Row("bottleneck_r16", bottleneck(16), ADAPTER_LRS),
    ]
    return {row.name: row for row in rows}


def decoder_rows() -> dict[str, Row]:
    """The SmolLM2-135M rows (head ``score`` saved with each adapter), each with a two-value sweep."""
    head = [DECODER_HEAD]
    rows = [
        Row("lora_r8", st.LoraConfig(r=8, alpha=16.0, modules_to_save=head), (1e-3, 3e-3)),
        Row("bone", st.DishaConfig(r=16, variant="bone", modules_to_save=head), (3e-4, 1e-3)),
        Row("surm_circulant", st.SurmConfig(structure="circulant", modules_to_save=head), (3e-3, 3e-2)),
    ]
    return {row.name: row for row in rows}
