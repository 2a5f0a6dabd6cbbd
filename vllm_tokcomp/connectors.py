"""Trained connectors served as methods: the server lists their files, a request picks one by method and count.

A connector (``connectors/``, ``lab/tokcomp_lab/train/connector.py`` in the repository) is a learned compressor
trained for one model's weights at one output count. The server owner names the files once, engine-wide
(``"tokcomp_connectors": ["DIR/c_abstractor-16", ...]``, each a ``STEM.safetensors`` + ``STEM.json`` pair);
a request then asks for ``tokcomp_method: "c_abstractor", tokcomp_budget: 16`` like any other method.
Requests cannot name files: loading weights from a client-chosen path is not a request's business.
No vLLM import here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError
from .methods.learned.io import LEARNED_CLASSES, load_connector


@dataclass(frozen=True)
class Connector:
    method: str
    tokens: int
    stem: Path
    weights_sha256: str | None  # of the model weights it was trained for


def is_connector_method(method: str) -> bool:
    """Whether ``method`` names a kind of trained connector (served only when the server lists one)."""
    return method in LEARNED_CLASSES


def read_catalog(stems: object, field: str) -> dict[tuple[str, int], Connector]:
    """``{(method, tokens): Connector}`` for the listed stems; errors name the entry (``field[i]``)."""
    if isinstance(stems, str) or not isinstance(stems, (list, tuple)):
        raise ConfigError(field, f"must be a list of connector paths (STEM of STEM.json), got {stems!r}")
    if not all(isinstance(stem, str) for stem in stems):
        raise ConfigError(field, "every entry must be a path (string)")
    return _read_catalog(tuple(stems), field)


@lru_cache(maxsize=16)
def _read_catalog(stems: tuple[str, ...], field: str) -> dict[tuple[str, int], Connector]:
    catalog: dict[tuple[str, int], Connector] = {}
    for index, text in enumerate(stems):
        where = f"{field}[{index}]"
        stem = Path(text).expanduser()
        if stem.suffix in (".json", ".safetensors"):
            stem = stem.with_suffix("")
        for suffix in (".json", ".safetensors"):
            if not stem.with_suffix(suffix).is_file():
                raise ConfigError(where, f"no file {stem.with_suffix(suffix)}")
        try:
            spec = json.loads(stem.with_suffix(".json").read_text())
            method, tokens = spec["method"], spec["tokens"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(where, f"{stem.with_suffix('.json')} is not a connector spec ({error})") from None
        if method not in LEARNED_CLASSES:
            raise ConfigError(where, f"unknown connector method {method!r}; known: {', '.join(LEARNED_CLASSES)}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(where, f"'tokens' must be a positive integer, got {tokens!r}")
        if (method, tokens) in catalog and catalog[(method, tokens)].stem.resolve() == stem.resolve():
            continue  # the same file pair named twice (e.g. a shell glob over STEM.json and STEM.safetensors)
        if (method, tokens) in catalog:
            raise ConfigError(where, f"a second {method} connector with {tokens} tokens (one of each per server)")
        catalog[(method, tokens)] = Connector(method, tokens, stem, spec.get("model_weights_sha256"))
    return catalog


def counts_of(catalog: dict[tuple[str, int], Connector], method: str) -> list[int]:
    return sorted(tokens for name, tokens in catalog if name == method)


def check_trained_for(catalog: dict[tuple[str, int], Connector], weights: Path | None, field: str) -> list[str]:
    """Refuse a connector trained for other weights than ``weights`` (the served ``model.safetensors``); returns
    the stems that could not be checked (no single weights file, or no digest in the spec), for a warning."""
    from .tiny.files import sha256

    digest = sha256(weights) if weights is not None and weights.is_file() else None
    unchecked = []
    for index, connector in enumerate(catalog.values()):
        if digest is None or connector.weights_sha256 is None:
            unchecked.append(str(connector.stem))
        elif connector.weights_sha256 != digest:
            raise ConfigError(
                f"{field}[{index}]",
                f"{connector.stem} was trained for other model weights (SHA-256 {connector.weights_sha256[:12]}..., "
                f"the served {weights.name} is {digest[:12]}...); its outputs would mean nothing to this LM",
            )
    return unchecked


class ConnectorModules:
    """Each listed connector's module, loaded when the model is built (a broken file stops startup, not a
    request), in fp32 (they are small and were trained in fp32), moved to the features' device on first use."""

    def __init__(self, catalog: dict[tuple[str, int], Connector]) -> None:
        self._modules: dict[tuple[str, int], torch.nn.Module] = {}
        for key, connector in catalog.items():
            try:
                self._modules[key] = load_connector(connector.stem)[0]
            except Exception as error:  # any failure to build or load: name the file
                raise RuntimeError(f"tokcomp: cannot load connector {connector.stem}: {error}") from error
        self._on_device: dict[tuple[str, int, torch.device], torch.nn.Module] = {}

    def get(self, method: str, tokens: int, device: torch.device) -> torch.nn.Module:
        key = (method, tokens, device)
        if key not in self._on_device:
            if (method, tokens) not in self._modules:
                raise RuntimeError(f"tokcomp: no {method} connector with {tokens} tokens was loaded")
            self._on_device[key] = self._modules[(method, tokens)].to(device)
        return self._on_device[key]
