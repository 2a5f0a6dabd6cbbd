"""The product benchmarks, reachable as ``tokcomp bench NAME`` (and ``python benchmarks/NAME.py`` in a checkout):
throughput, memory-bound, serving, accuracy, method cost and the GPU geometry run. Research instruments (probes,
training yardsticks) stay in the repository's ``benchmarks/``."""
