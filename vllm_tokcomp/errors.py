"""The plugin's configuration error, shared by the config parser and the connector catalog (no imports)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad tokcomp setting; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
