"""Training of the bundled tiny LLaVA on the synthetic VQA task (``python -m vllm_tokcomp.train.llava``)."""
