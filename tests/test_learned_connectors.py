"""Learned connectors (``vllm_tokcomp.methods.learned``): the mean-residual start, save/load, and the bundled
connectors (connectors/) against the bundled model. The trainer and its benchmark are tested in
lab/tests/test_train_connector.py.

The plain references below (block means, raster-chunk means) are written independently of the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens
from vllm_tokcomp.methods.learned.io import build_connector, load_connector, save_connector
from vllm_tokcomp.methods.learned.residual import MeanResidual

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def connector_kwargs(method: str, dim: int, tokens: int) -> dict:
    """Constructor arguments of a connector with ``tokens`` outputs on the 24 x 24 grid (the trainer's presets)."""
    side = int(tokens**0.5)
    return {"pixel_unshuffle": {"in_dim": dim, "out_dim": dim, "factor": 24 // side},
            "c_abstractor": {"in_dim": dim, "out_dim": dim, "out_grid": [side, side]},
            "qformer": {"in_dim": dim, "out_dim": dim, "num_queries": tokens, "num_heads": 4}}[method]


def block_means(x: torch.Tensor, side: int, block: int) -> torch.Tensor:
    """Raster-ordered means of ``block x block`` squares of a ``side x side`` grid of rows of ``x``."""
    cells = side // block
    return x.reshape(cells, block, cells, block, -1).mean(dim=(1, 3)).reshape(cells * cells, -1)


@pytest.mark.parametrize("tokens", [16, 64])
@pytest.mark.parametrize("method", ["pixel_unshuffle", "c_abstractor"])
def test_grid_connectors_start_at_block_means(method: str, tokens: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(576, DIM)
    connector = build_connector(method, connector_kwargs(method, DIM, tokens)).start_at_mean()
    out = connector(VisualTokens(x, (24, 24)))
    torch.testing.assert_close(out.features, block_means(x, 24, 24 // int(tokens**0.5)), atol=1e-5, rtol=1e-5)
    assert out.sizes.tolist() == [576 // tokens] * tokens


def test_qformer_starts_at_raster_chunk_means() -> None:
    torch.manual_seed(0)
    x = torch.randn(576, DIM)
    connector = build_connector("qformer", connector_kwargs("qformer", DIM, 64)).start_at_mean()
    torch.testing.assert_close(connector(VisualTokens(x, (24, 24))).features, x.reshape(64, 9, DIM).mean(1),
                               atol=1e-5, rtol=1e-5)


def test_zeroed_output_layer_still_learns() -> None:
    """The start is the mean, but the gradient reaches the zeroed layer, so training moves away from it."""
    torch.manual_seed(0)
    connector = build_connector("pixel_unshuffle", connector_kwargs("pixel_unshuffle", DIM, 64)).start_at_mean()
    connector(VisualTokens(torch.randn(576, DIM), (24, 24))).features.pow(2).sum().backward()
    last = connector.inner.mlp[-1]
    assert torch.count_nonzero(last.weight) == 0 and last.weight.grad.abs().sum() > 0


def test_save_and_load_round_trip_in_bf16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = connector_kwargs("c_abstractor", DIM, 16)
    connector = build_connector("c_abstractor", kwargs)
    spec = {"method": "c_abstractor", "kwargs": kwargs, "mean_residual": True, "tokens": 16, "steps": 7}
    save_connector(connector, spec, tmp_path / "conn")
    loaded, loaded_spec = load_connector(tmp_path / "conn")
    assert isinstance(loaded, MeanResidual) and loaded_spec == spec and not loaded.training
    for key, value in connector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key
    with pytest.raises(ValueError, match="'kwargs'"):
        save_connector(connector, {"method": "c_abstractor", "mean_residual": True}, tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown learned compressor 'resampler'"):
        build_connector("resampler", {})


def test_bundled_connectors_load_for_the_bundled_model() -> None:
    import hashlib

    from vllm_tokcomp.tiny.llava_builder import ensure_trained_model

    stems = sorted(path.with_suffix("") for path in (REPO_ROOT / "connectors").glob("*.json"))
    assert {stem.name for stem in stems} == {"pixel_unshuffle-16", "c_abstractor-16", "qformer-16",
                                             "pixel_unshuffle-64", "c_abstractor-64", "qformer-64"}
    digest = hashlib.sha256((ensure_trained_model() / "model.safetensors").read_bytes()).hexdigest()
    for stem in stems:
        module, spec = load_connector(stem)
        tokens = int(stem.name.rsplit("-", 1)[1])
        assert spec["model_weights_sha256"] == digest and spec["tokens"] == tokens and spec["method"] in stem.name
        assert module.output_count((24, 24)) == tokens and spec["steps"] > 0


