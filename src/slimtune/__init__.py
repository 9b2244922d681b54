"""slimtune: parameter-efficient fine-tuning and linear-attention conversion for PyTorch and HF transformers."""

__version__ = "0.1.0"

from slimtune.adapters.base import AdaptedLayer, Adapter, AdditiveAdapter
from slimtune.adapters.bottleneck import BottleneckConfig
from slimtune.adapters.disha import DishaConfig
from slimtune.adapters.lora import LoraConfig
from slimtune.adapters.lora_sp import LoraSpConfig
from slimtune.adapters.surm import SurmAdapterConfig, SurmConfig
from slimtune.config import AdapterConfig
from slimtune.errors import (
    AdapterFileError,
    AdapterNameError,
    ConfigError,
    DeviceError,
    MergeError,
    ShapeError,
    SlimtuneError,
    TargetModulesError,
)
from slimtune.export import export_peft
from slimtune.inject import (
    ParameterCounts,
    active_adapters,
    adapted_layers,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    get_adapted_model,
    merge_adapters,
    merge_and_unload,
    parameter_counts,
    set_adapter,
    unload,
    unmerge_adapters,
)
from slimtune.lora_conversion import LoraConversion, convert_to_lora
from slimtune.peft_import import import_peft
from slimtune.registry import METHODS, config_from_dict
from slimtune.serialization import load_adapter, save_adapter

__all__ = [
    "METHODS",
    "AdaptedLayer",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "AdditiveAdapter",
    "BottleneckConfig",
    "ConfigError",
    "DeviceError",
    "DishaConfig",
    "LoraConfig",
    "LoraConversion",
    "LoraSpConfig",
    "MergeError",
    "ParameterCounts",
    "ShapeError",
    "SlimtuneError",
    "SurmAdapterConfig",
    "SurmConfig",
    "TargetModulesError",
    "__version__",
    "active_adapters",
    "adapted_layers",
    "adapter_configs",
    "config_from_dict",
    "convert_to_lora",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "get_adapted_model",
    "import_peft",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "parameter_counts",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge_adapters",
]
