"""Throughput benchmarks behind `ccl bench`: the input pipeline, the contrastive kernel, training epochs."""
