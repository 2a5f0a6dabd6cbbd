"""The research side of vllm-tokcomp, not in the wheel: training and transformers references (lab/README.md)."""
