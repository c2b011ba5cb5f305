"""Typed configuration (``server_config`` and ``readers_config``) and its loader.

Precedence, lowest to highest: defaults < ``config.yaml`` (``takeoff:``) < ``TAKEOFF_*`` environment < flags.
"""

from __future__ import annotations

from liftoff.config.loader import ConfigError, LoadedConfig, load_config
from liftoff.config.models import AppConfig, ReaderConfig

__all__ = ["AppConfig", "ConfigError", "LoadedConfig", "ReaderConfig", "load_config"]
