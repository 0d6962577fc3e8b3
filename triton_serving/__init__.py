"""diffserve's Triton serving room: everything that runs against a Triton server, apart from building
what it serves.

``export`` builds the artifacts (ONNX files, TensorRT plans, a model repository); this package runs
them. ``distribution`` finds the ``tritonserver`` shipped in the nvidia-pytriton wheel and prepares
what its python-backend stubs need (backend directory, Python shim, environment); ``server`` is the
``TritonServer`` process (an ``diffserve.engine.processes.ChildProcess`` in a lifeline group) and
``serve_until_stopped``; ``supervisor`` restarts a server that died, with backoff; ``client`` sends
``diffserve.engine.request.GenerationRequest``s to the pipeline models over gRPC; ``manifest`` reads the
``repository.json`` of a built repository; ``stub_params`` holds the typed ``config.pbtxt``
parameters and exit hook that the exporter writes and the stub templates under
``model_repository/templates`` read back.

The name says what the room serves with: ``serving`` alone would read as the ``tests/serving``
folder (every test that starts a server), and ``triton`` is the import name of OpenAI's Triton
compiler, which torch imports. This package imports engine and nothing else of the project;
export, benchmarks, api and the stub templates import it, engine never does.
"""
