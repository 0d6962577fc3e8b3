"""Latency, throughput, serving-overhead, cost and capacity benchmarks (``diffserve bench``).

Above ``engine``, ``triton_serving`` and ``export``, below ``api`` (whose CLI mounts
``diffserve.benchmarks.cli``; the serving benchmark starts ``diffserve serve`` as a child process rather than
importing the API). The results side, each module importing only those before it: ``environment``
(where a run happened), ``record`` (the JSON record), ``plots``, ``report`` (markdown and the files
on disk), ``index`` (the results table). The measurements use it, never the reverse:
``engine_bench`` (one slug in-process, against diffusers; with ``full_size``, the published
architectures with random weights, and ``floors``, the H100 compute floors; ``figures`` reads each
slug's constants from its model family), ``serve_bench`` (load
on the HTTP API and on Triton's pipeline models), ``capacity`` (cost and GPUs from the measured
curves); ``cli`` composes the commands.
"""
