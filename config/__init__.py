"""Configuration: one pydantic-settings tree, read at the edges of the service."""

from config.settings import Environment, Settings, SettingsError, load_settings

__all__ = ["Environment", "Settings", "SettingsError", "load_settings"]
