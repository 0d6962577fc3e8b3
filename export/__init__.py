"""diffserve's export layer: diffusers checkpoint -> ONNX (+ TensorRT plan) -> Triton model repository,
and running Triton on it.

``onnx_export`` traces one component from its descriptor (cached by a pure artifact path);
``repository`` exports a checkpoint's components (``export_components``) and writes every model
directory and ``config.pbtxt`` (``build_repository``, ``build_demo_repository``); ``stub_params``
holds the typed parameters and the exit hook the stub templates under ``model_repository/`` share;
``triton_server`` launches and supervises the ``tritonserver`` of the nvidia-pytriton wheel;
``triton_client`` sends ``engine.request.GenerationRequest``s to the pipeline models over gRPC;
``cli`` is the ``diffserve export`` and ``diffserve triton`` command line. Imports engine, never api.
"""
