"""Everything that touches vLLM lives in this package, one small module per concern.

* ``vllm_api``: the few vLLM internals we depend on, each wrapped once, with the
  vLLM version it was checked against (tests/test_vllm_api.py fails loudly when
  a vLLM upgrade moves them).
* ``settings``: per-image compression settings carried from the processor to the model.
* ``clip_signals``: CLS attention and keys captured from a CLIP tower's feature layer.
* ``llava``: the LLaVA-1.5 processor and model subclasses.
"""
