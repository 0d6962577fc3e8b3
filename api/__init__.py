"""The HTTP facade of diffserve and the ``diffserve`` command line: the top layer.

It serves the Segmind contract (``POST /v1/<slug>``, ``POST /v2/<slug>``, ``/v2/requests/...``) on
FastAPI: ``app`` builds the application, ``routes/`` holds the thin routers, ``deps`` the auth,
rate-limit and model dependencies, ``schemas`` and ``urls`` the wire shapes, ``settings`` the one
``DIFFSERVE_*`` configuration object. Every generation is a job (``jobs``: the SQLite store;
``runner``: queue, concurrency, cancel, deadlines; ``quotas``: credits and rate limits; ``inputs``:
decoded input images of queued jobs), and a job runs on a ``GenerationBackend`` (``backend``):
``backend_local`` (engine pipelines in this process) or ``backend_triton`` (pipeline models on
Triton, via ``diffserve.triton_serving.client``). Input images are decoded once, by ``images`` (the SSRF
boundary), into uint8 ``[H, W, 3]`` arrays that travel unchanged to the pipeline. ``cli`` composes
the whole command line. This package imports engine, triton_serving, export and benchmarks; nothing
below imports it.
"""
