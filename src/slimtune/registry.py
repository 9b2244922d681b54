"""Method name → config class. A config names its adapter class (``config.adapter_class``) and builds its adapters
(``config.build_adapter(layer, name)``)."""

from __future__ import annotations

from typing import Any

from slimtune.adapters.bottleneck import BottleneckConfig
from slimtune.adapters.disha import DishaConfig
from slimtune.adapters.lora import LoraConfig
from slimtune.adapters.lora_sp import LoraSpConfig
from slimtune.adapters.surm import SurmAdapterConfig, SurmConfig
from slimtune.config import AdapterConfig
from slimtune.errors import ConfigError

METHODS: dict[str, type[AdapterConfig]] = {
    LoraConfig.method: LoraConfig,
    DishaConfig.method: DishaConfig,
    LoraSpConfig.method: LoraSpConfig,
    SurmConfig.method: SurmConfig,
    SurmAdapterConfig.method: SurmAdapterConfig,
    BottleneckConfig.method: BottleneckConfig,
}


def config_class(method: str) -> type[AdapterConfig]:
    """The config class of ``method``; ConfigError naming the allowed methods otherwise."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not known: allowed methods are {sorted(METHODS)}")
    return METHODS[method]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild any method's config from ``config.to_dict()`` output."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"an adapter config needs a 'method' field; got {data!r}")
    return config_class(data["method"]).from_dict(data)
