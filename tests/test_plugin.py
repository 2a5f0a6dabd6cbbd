"""The entry point: registered, idempotent, and inert/cheap until vLLM builds a LLaVA model."""

import importlib.metadata
import subprocess
import sys


def test_entry_point_is_declared():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "tokcomp" and ep.value == "vllm_tokcomp.plugin:register" for ep in entry_points)


def test_register_is_idempotent_lazy_and_overrides_llava():
    code = """
import sys
from vllm_tokcomp.plugin import register
register(); register()
assert "vllm_tokcomp.integration.llava" not in sys.modules, "model code must be imported lazily"
from vllm import ModelRegistry
model = ModelRegistry.models["LlavaForConditionalGeneration"]
print(getattr(model, "module_name", None), getattr(model, "class_name", None))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "vllm_tokcomp.integration.llava CompressedLlava" in out


def test_register_never_raises(monkeypatch):
    import vllm_tokcomp.plugin as plugin

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated vLLM change")

    import vllm

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(vllm.ModelRegistry, "register_model", broken)
    plugin.register()  # logs, does not raise
    assert plugin._registered is False
