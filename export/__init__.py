"""diffserve's export layer: diffusers checkpoint -> ONNX (+ TensorRT plan) -> Triton model repository.

``onnx_export`` traces one component from its descriptor (cached by a pure artifact path);
``repository`` exports a checkpoint's components (``export_components``) and writes every model
directory and ``config.pbtxt`` (``build_repository``, ``build_demo_repository``), their parameters
the typed dataclasses of ``diffserve.triton_serving.stub_params``; ``cli`` is the ``diffserve export`` and
``diffserve triton`` command line (``triton`` builds the demo repository when asked, then runs
``diffserve.triton_serving.server``). Running Triton is ``triton_serving``'s. Imports engine and
triton_serving, never benchmarks or api.
"""
