"""The prepared GPU run (``benchmarks/gpu/run.sh``): the plan, its time guard and its summary."""
