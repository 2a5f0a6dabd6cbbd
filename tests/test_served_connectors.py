"""Trained connectors served through the plugin: configuration (vLLM against the transformers reference:
lab/tests/test_served_connectors_reference.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_tokcomp.config import (
    CONNECTORS_KEY,
    CompressionSpec,
    ConfigError,
    engine_connectors,
    parse_engine_config,
    resolve_request,
)
from vllm_tokcomp.connectors import ConnectorModules, check_trained_for
from vllm_tokcomp.methods import VisualTokens

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "connectors"
C16, C64, Q16 = (str(BUNDLED / name) for name in ("c_abstractor-16", "c_abstractor-64", "qformer-16"))
WEIGHTS = REPO / "vllm_tokcomp" / "assets" / "tiny_llava_vqa.safetensors"
ENGINE = {CONNECTORS_KEY: [C16, C64, Q16]}


def test_engine_picks_a_listed_connector_by_method_and_count() -> None:
    spec = parse_engine_config({**ENGINE, "tokcomp_method": "c_abstractor", "tokcomp_budget": 64})
    assert spec == CompressionSpec("c_abstractor", 64)
    # one count loaded: it is the default
    assert parse_engine_config({**ENGINE, "tokcomp_method": "qformer"}) == CompressionSpec("qformer", 16)
    # listing connectors alone leaves compression off by default
    assert parse_engine_config(ENGINE) is None
    assert sorted(engine_connectors(ENGINE)) == [("c_abstractor", 16), ("c_abstractor", 64), ("qformer", 16)]
    # a shell glob names each pair twice, once per file
    globbed = engine_connectors({CONNECTORS_KEY: sorted(str(path) for path in BUNDLED.glob("c_abstractor-16.*"))})
    assert list(globbed) == [("c_abstractor", 16)]


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"tokcomp_budget": 32}, "tokcomp_budget", "16, 64"),
        ({}, "tokcomp_budget", "16, 64"),  # two counts loaded: the budget must say which
        ({"tokcomp_ratio": 0.1}, "tokcomp_ratio", "fixed counts"),
        ({"tokcomp_budget": "auto"}, "tokcomp_budget", "16, 64"),
        ({"tokcomp_budget": 16, "tokcomp_options": {"x": 1}}, "tokcomp_options", "no options"),
    ],
)
def test_bad_connector_settings_name_the_field(extra: dict, field: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_engine_config({**ENGINE, "tokcomp_method": "c_abstractor", **extra})
    assert error.value.field == f"mm_processor_kwargs.{field}"
    assert says in str(error.value)


def test_requests_pick_connectors_but_cannot_list_them() -> None:
    engine = {**ENGINE, "tokcomp_method": "tome", "tokcomp_budget": 64}
    # the engine's 64 belongs to tome; qformer has 16 only
    assert resolve_request(engine, {"tokcomp_method": "qformer"}) == CompressionSpec("qformer", 16)
    assert resolve_request(engine, {"tokcomp_method": "c_abstractor", "tokcomp_budget": 16}) == CompressionSpec(
        "c_abstractor", 16)
    with pytest.raises(ConfigError) as error:
        resolve_request(engine, {CONNECTORS_KEY: [C16]})
    assert error.value.field == f"mm_processor_kwargs.{CONNECTORS_KEY}" and "server" in str(error.value)
    with pytest.raises(ConfigError) as error:  # a server that lists none
        resolve_request({"tokcomp_method": "tome"}, {"tokcomp_method": "pixel_unshuffle", "tokcomp_budget": 16})
    assert error.value.field == "mm_processor_kwargs.tokcomp_method" and CONNECTORS_KEY in str(error.value)


def test_bad_listings_name_the_entry(tmp_path: Path) -> None:
    def refused(listing: object) -> ConfigError:
        with pytest.raises(ConfigError) as error:
            parse_engine_config({CONNECTORS_KEY: listing, "tokcomp_method": "qformer"})
        return error.value

    assert refused(C16).field == f"mm_processor_kwargs.{CONNECTORS_KEY}"  # a string, not a list
    assert refused([C16, str(tmp_path / "missing")]).field == f"mm_processor_kwargs.{CONNECTORS_KEY}[1]"
    (tmp_path / "odd.json").write_text(json.dumps({"method": "resampler", "tokens": 8}))
    (tmp_path / "odd.safetensors").write_bytes(b"")
    assert "unknown connector method 'resampler'" in str(refused([str(tmp_path / "odd")]))
    (tmp_path / "odd.json").write_text("{not json")
    assert "not a connector spec" in str(refused([str(tmp_path / "odd")]))
    shutil.copy(BUNDLED / "c_abstractor-16.json", tmp_path / "again.json")
    shutil.copy(BUNDLED / "c_abstractor-16.safetensors", tmp_path / "again.safetensors")
    second = refused([C16, str(tmp_path / "again")])
    assert second.field == f"mm_processor_kwargs.{CONNECTORS_KEY}[1]" and "second c_abstractor" in str(second)


def test_connectors_must_be_trained_for_the_served_weights(tmp_path: Path) -> None:
    catalog = engine_connectors(ENGINE)
    assert check_trained_for(catalog, WEIGHTS, "f") == []  # the bundled connectors match the bundled model
    other = tmp_path / "model.safetensors"
    other.write_bytes(WEIGHTS.read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError) as error:
        check_trained_for(catalog, other, "f")
    assert error.value.field == "f[0]" and "other model weights" in str(error.value)
    assert len(check_trained_for(catalog, None, "f")) == 3  # nothing to compare with: reported, not refused


def test_connector_modules_load_at_construction(tmp_path: Path) -> None:
    import torch

    modules = ConnectorModules(engine_connectors(ENGINE))
    features = torch.randn(576, 256)
    out = modules.get("qformer", 16, torch.device("cpu"))(VisualTokens(features, (24, 24)))
    assert out.features.shape == (16, 256)
    shutil.copy(BUNDLED / "qformer-16.json", tmp_path / "broken.json")
    shutil.copy(BUNDLED / "c_abstractor-16.safetensors", tmp_path / "broken.safetensors")  # other weights
    with pytest.raises(RuntimeError, match="cannot load connector .*broken"):
        ConnectorModules(engine_connectors({CONNECTORS_KEY: [str(tmp_path / "broken")]}))


def test_tokcomp_serve_passes_absolute_connector_paths(monkeypatch, tmp_path: Path) -> None:
    from vllm_tokcomp.cli import build_serve_command

    monkeypatch.chdir(REPO)
    command, _ = build_serve_command([str(tmp_path), "--method", "c_abstractor", "--budget", "16",
                                      "--connector", "connectors/c_abstractor-16"])
    kwargs = json.loads(command[command.index("--mm-processor-kwargs") + 1])
    assert kwargs[CONNECTORS_KEY] == [C16] and kwargs["tokcomp_method"] == "c_abstractor"
    with pytest.raises(ConfigError):
        build_serve_command([str(tmp_path), "--method", "c_abstractor", "--budget", "32", "--connector", C16])


def test_qwen_refuses_connectors() -> None:
    from vllm_tokcomp.integration.qwen_routes import check_served_on_qwen

    with pytest.raises(ConfigError, match="LLaVA only"):
        check_served_on_qwen(CompressionSpec("c_abstractor", 16), "mm_processor_kwargs.tokcomp_method")


