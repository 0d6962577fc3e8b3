"""Latency, throughput, serving-overhead, cost and capacity benchmarks (``diffserve bench``)."""
