"""Throughput, serving and memory-bound benchmarks of vllm-tokcomp against plain vLLM (see docs/benchmarks.md)."""
