"""Everything that touches vLLM lives in this package, one small module per concern.

* ``vllm_api``: the vLLM internals we depend on, each wrapped once, with the vLLM
  version it was checked against (tests/test_vllm_api.py fails loudly when a
  vLLM upgrade moves them).
* ``settings``: per-image compression settings and the text query, carried from the processor to the model.
* ``llava``: the LLaVA-1.5 processor and model subclasses.
* ``qwen2_vl``: the Qwen2-VL / Qwen2.5-VL processor and model subclasses (M-RoPE positions).
* ``clip_signals``: CLS attention and keys captured from a CLIP tower's feature layer.
* ``mustdrop_tower``: MustDrop's stage-1 window merge inside the CLIP tower.
* ``lm_probe``: text->vision attention from the LM's first layers, before any KV cache exists.
* ``kv_probe``: a scheduler subclass that records the KV blocks every request really held.
"""
