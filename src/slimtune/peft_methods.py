"""The methods slimtune and PEFT share, mapped both ways: configs, and each layer's tensors.

- LoRA and LoRA-SP ↔ PEFT ``LORA``: ``lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r) are slimtune's
  A and B (LoRA-SP's dense ones); ``lora_alpha``, ``use_rslora`` and ``lora_dropout`` map one to one. GPT-2
  ``Conv1D`` layers keep the same orientation; PEFT records ``fan_in_fan_out``.
- DiSHA ↔ PEFT ``MISS``: ``miss_block`` is slimtune's ``block``; ``init_weights`` True (or False, random init
  of the same math) is Bone, ``"bat"`` Bat-Col, ``"mini"`` mini with ``mini_r``. Bat-Row has no MiSS form.
- SURM circulant (LoRA-replacement mode) ↔ PEFT ``C3A``: C3A's kernel w (p, q, b) puts w[(s − r) mod b] / d_in
  at [r, s] of a block, slimtune's α·Circ(c_b ⊙ c_a) puts α·c[(r − s) mod b] there; so w[k] = d_in·α·c[(−k) mod b]
  (float32, as C3A keeps it) and an import sets c_a = 1, c_b = w[(−k) mod b] / d_in, α = 1.

Each mapping: :meth:`PeftMethod.export_fields` / :meth:`PeftMethod.export_tensors` for writing,
:meth:`PeftMethod.import_config` / :meth:`PeftMethod.import_tensors` for reading. Only ``nn.Linear`` layers go to
MiSS and C3A (PEFT adapts nothing else with them). The output adapters (SURM's adapter mode, the bottleneck
adapter) have no PEFT form: :func:`peft_method_of` refuses them.
"""

from __future__ import annotations

import abc
import collections
import math
import re
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from slimtune.adapters.base import AdaptedLayer, Adapter, conv1d_class
from slimtune.adapters.bottleneck import BottleneckConfig
from slimtune.adapters.disha import DishaConfig
from slimtune.adapters.lora import LoraConfig
from slimtune.adapters.surm import SurmAdapterConfig, SurmConfig
from slimtune.config import AdapterConfig
from slimtune.errors import AdapterFileError, ConfigError
from slimtune.functional.structured import c3a_kernel_to_circulant
from slimtune.peft_format import check_pattern

Shapes = dict[str, tuple[int, int]]  # module name → (d_in, d_out) of its layer
MISS_VARIANTS = {"bone": True, "bat_col": "bat", "mini": "mini"}  # slimtune variant → MiSS init_weights


class PeftMethod(abc.ABC):
    """One PEFT method (``peft_type``) and how its files map to slimtune's configs and adapter tensors."""

    peft_type: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # the names of a module's tensors in PEFT's file
    used_fields: ClassVar[frozenset[str]]  # the config fields the import reads (or knows to be harmless)
    linear_only: ClassVar[bool] = True

    def check_layers(self, layers: list[tuple[str, AdaptedLayer]]) -> None:
        """ConfigError for a layer PEFT's method cannot adapt (MiSS and C3A: anything but ``nn.Linear``)."""
        others = [name for name, layer in layers if not isinstance(layer.base_layer, nn.Linear)]
        if self.linear_only and others:
            raise ConfigError(
                f"module {others[0]!r} is a {type(dict(layers)[others[0]].base_layer).__name__}: PEFT's "
                f"{self.peft_type} adapts only nn.Linear layers, so this adapter cannot be exported for PEFT"
            )

    @abc.abstractmethod
    def export_fields(self, config: AdapterConfig, layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Any]:
        """The method's fields of ``adapter_config.json`` for ``config`` on ``layers`` (name, layer)."""

    @abc.abstractmethod
    def export_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """One layer's tensors in PEFT's form, suffix (e.g. ``lora_A.weight``) → tensor, detached, on the adapter's
        device."""

    @abc.abstractmethod
    def import_config(
        self, record: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], shapes: Shapes, path: Path
    ) -> AdapterConfig:
        """The slimtune config of the PEFT config ``record`` read from ``path``, for the modules of ``tensors``
        (module → suffix → tensor), whose layers are ``shapes`` (module → (d_in, d_out)). ConfigError for what
        slimtune cannot express."""

    @abc.abstractmethod
    def import_tensors(self, tensors: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
        """PEFT's tensors of one layer (checked against :meth:`export_tensors` of ``adapter``) → the names and
        values of ``adapter.saved_tensors()``."""


class LoraMethod(PeftMethod):
    peft_type = "LORA"
    suffixes = ("lora_A.weight", "lora_B.weight")
    used_fields = frozenset(
        {"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "fan_in_fan_out"}
        | {"rank_pattern", "alpha_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying"}
    )
    linear_only = False
    # Initialisations that leave the base weight alone: others (PiSSA, OLoRA, CorDA, LoftQ, MiCA, LoRA-GA) change
    # it when PEFT builds the layer, also when loading, so a plain base + these tensors would not be PEFT's model.
    base_preserving_inits = (True, False, "gaussian", "eva", "orthogonal")

    def export_fields(self, config: AdapterConfig, layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Any]:
        config = cast(LoraConfig, config)
        conv1d = conv1d_class()
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "fan_in_fan_out": conv1d is not None and any(isinstance(layer.base_layer, conv1d) for _, layer in layers),
            "init_lora_weights": True,
            "use_dora": False,
            "lora_bias": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def export_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        saved = adapter.saved_tensors()
        return {"lora_A.weight": saved["lora_A"], "lora_B.weight": saved["lora_B"]}

    def import_config(
        self, record: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], shapes: Shapes, path: Path
    ) -> AdapterConfig:
        init = record.get("init_lora_weights", True)
        if not any(init is allowed or init == allowed for allowed in self.base_preserving_inits):
            raise ConfigError(
                f"{path}: init_lora_weights={init!r} is not allowed: PEFT changes the base weights for it when "
                f"loading, which slimtune does not; allowed: {list(self.base_preserving_inits)} (convert the adapter "
                "with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first)"
            )
        check_pattern(record, "rank_pattern", record.get("r"), path)
        check_pattern(record, "alpha_pattern", record.get("lora_alpha"), path)
        return LoraConfig(
            r=record.get("r", 8),
            alpha=record.get("lora_alpha", 8),
            dropout=record.get("lora_dropout", 0.0),
            use_rslora=record.get("use_rslora", False),
            target_modules=list(tensors),
        )

    def import_tensors(self, tensors: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
        return {"lora_A": tensors["lora_A.weight"], "lora_B": tensors["lora_B.weight"]}


class MissMethod(PeftMethod):
    peft_type = "MISS"
    suffixes = ("miss_block",)
    used_fields = frozenset({"r", "miss_dropout", "mini_r", "init_weights"})

    def export_fields(self, config: AdapterConfig, layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Any]:
        config = cast(DishaConfig, config)
        init_weights = MISS_VARIANTS[config.variant]
        return {"r": config.r, "miss_dropout": config.dropout, "mini_r": config.mini_r, "init_weights": init_weights}

    def export_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        return {"miss_block": adapter.saved_tensors()["block"]}

    def import_config(
        self, record: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], shapes: Shapes, path: Path
    ) -> AdapterConfig:
        init = record.get("init_weights", True)
        variant = "bone" if isinstance(init, bool) else {"bat": "bat_col", "mini": "mini"}.get(str(init))
        if variant is None:
            raise ConfigError(
                f"{path}: init_weights={init!r} is not allowed: expected True or False (Bone), 'bat' (Bat-Col) or "
                "'mini'"
            )
        # PEFT's Bat forms W + ΔW and applies no dropout, whatever miss_dropout says.
        dropout = 0.0 if variant == "bat_col" else record.get("miss_dropout", 0.0)
        return DishaConfig(
            r=record.get("r", 64),
            variant=variant,
            mini_r=record.get("mini_r", 1),
            dropout=dropout,
            target_modules=list(tensors),
        )

    def import_tensors(self, tensors: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
        return {"block": tensors["miss_block"]}


class C3aMethod(PeftMethod):
    peft_type = "C3A"
    suffixes = ("c3a_kernel",)
    used_fields = frozenset({"block_size", "block_size_pattern", "init_weights"})

    def export_fields(self, config: AdapterConfig, layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Any]:
        r"""``block_size`` the most common block size; ``block_size_pattern`` the layers with another one (slimtune's
        default block size is each layer's gcd(d_in, d_out)).

        C3A picks a layer's pattern key with ``re.match(rf".*\\.{key}$", name)``, which needs a dot before the key, so
        a plain full name never matches; the key ``(?!)|^<name>`` (a first branch that always fails, then the exact
        name) matches exactly that layer, also under PEFT's ``(.*\\.)?({key})$`` used by its other methods.
        """
        config = cast(SurmConfig, config)
        sizes = {name: config.block_size or math.gcd(layer.d_in, layer.d_out) for name, layer in layers}
        common = collections.Counter(sizes.values()).most_common(1)[0][0]
        pattern = {f"(?!)|^{re.escape(name)}": size for name, size in sizes.items() if size != common}
        return {"block_size": common, "block_size_pattern": pattern, "init_weights": True}

    def export_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        operator = cast(Any, adapter).operator
        c = operator.c_b.detach().double() * operator.c_a.detach().double() * operator.scale  # (p, q, b)
        b = c.shape[-1]
        kernel = c[..., (-torch.arange(b, device=c.device)) % b] * adapter.d_in  # w[k] = d_in·α·c[(−k) mod b]
        return {"c3a_kernel": kernel.float().cpu()}

    def import_config(
        self, record: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], shapes: Shapes, path: Path
    ) -> AdapterConfig:
        """The block size from the kernels' shapes: one for every module, else None when each module's is its
        layer's gcd (slimtune's default), else ConfigError."""
        flat = [name for name, t in tensors.items() if "c3a_kernel" in t and t["c3a_kernel"].dim() != 3]
        if flat:
            shape = tuple(tensors[flat[0]]["c3a_kernel"].shape)
            raise AdapterFileError(f"{path}: module {flat[0]!r} has a c3a_kernel of shape {shape}; expected (p, q, b)")
        sizes = {name: t["c3a_kernel"].shape[-1] for name, t in tensors.items() if "c3a_kernel" in t}
        distinct = sorted(set(sizes.values()))
        block_size = distinct[0] if len(distinct) == 1 else None
        if len(distinct) > 1 and any(math.gcd(*shapes[name]) != size for name, size in sizes.items()):
            raise ConfigError(
                f"{path}: block sizes {distinct} differ between modules, and not as each layer's gcd(d_in, d_out): a "
                "slimtune SurmConfig has one block_size, or None for each layer's gcd"
            )
        return SurmConfig(structure="circulant", block_size=block_size, alpha=1.0, target_modules=list(tensors))

    def import_tensors(self, tensors: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
        kernel = tensors["c3a_kernel"].double()
        return {
            "operator.c_a": torch.ones(kernel.shape),
            "operator.c_b": c3a_kernel_to_circulant(kernel, adapter.d_in),
        }


PEFT_METHODS: dict[str, PeftMethod] = {m.peft_type: m for m in (LoraMethod(), MissMethod(), C3aMethod())}


def peft_method_of(config: AdapterConfig) -> PeftMethod:
    """The PEFT method with ``config``'s math; ConfigError (saying what is allowed) when there is none."""
    if isinstance(config, LoraConfig):
        return PEFT_METHODS["LORA"]
    if isinstance(config, DishaConfig):
        if config.variant not in MISS_VARIANTS:
            raise ConfigError(
                f"variant={config.variant!r} has no PEFT equivalent: PEFT MiSS has {list(MISS_VARIANTS)} (Bat-Row "
                "shares a block along the input blocks, MiSS's Bat along the output blocks)"
            )
        return PEFT_METHODS["MISS"]
    if isinstance(config, BottleneckConfig):
        raise ConfigError(
            "method='bottleneck' has no PEFT equivalent: PEFT has no bottleneck adapter, and this non-linear "
            "adapter is no weight update; allowed for export are 'lora', 'lora_sp', 'disha' and 'surm' (save a "
            "bottleneck adapter with save_adapter)"
        )
    if isinstance(config, SurmAdapterConfig):
        raise ConfigError(
            "method='surm_adapter' has no PEFT equivalent: PEFT's C3A replaces LoRA's update; export a SurmConfig "
            "(LoRA-replacement mode) with structure='circulant'"
        )
    if isinstance(config, SurmConfig):
        if config.structure != "circulant":
            raise ConfigError(
                f"structure={config.structure!r} has no PEFT equivalent: allowed for export is 'circulant' "
                "(PEFT C3A); PEFT has no Toeplitz or LDR adapter, and its LoKr differs from SURM's Kronecker"
            )
        return PEFT_METHODS["C3A"]
    raise ConfigError(
        f"method={config.method!r} has no PEFT equivalent: allowed are 'lora', 'lora_sp', 'disha' (bone, bat_col, "
        "mini) and 'surm' with structure='circulant'"
    )
