"""Configuration: structured defaults, YAML files with ``_BASE_`` and command-line overrides."""
from .config import (
    ConfigError,
    cfg_from_string,
    cfg_to_yaml,
    default_cfg,
    get_cfg,
    merge_from_file,
    merge_from_list,
)

__all__ = [
    "ConfigError",
    "cfg_from_string",
    "cfg_to_yaml",
    "default_cfg",
    "get_cfg",
    "merge_from_file",
    "merge_from_list",
]
