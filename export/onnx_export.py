"""Export checkpoint components to ONNX (and TensorRT plans where TensorRT and a GPU exist).

Each component is traced from the same wrapper module the torch runtime runs
(``diffserve.engine.runtime_torch``), with input/output names and dynamic axes from its descriptor
(``diffserve.engine.descriptors``). Artifact paths are a pure function of (component, precision,
toolkit versions); a sidecar JSON records the source fingerprint, so re-running export skips
what is up to date.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffserve.engine.descriptors import ComponentDescriptor

logger = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARITY_TOLERANCE = {"fp32": 5e-3, "fp16": 5e-2, "bf16": 2e-1}
"""Largest accepted max |onnx - torch| of an export's parity check, relative to max(1, max |torch output|).
The tiny fp32 models agree to ~1e-5; a wider gap means a wrong graph, not rounding."""
# Checkpoint sub-directories holding each component's weights, for the up-to-date fingerprint.
SOURCE_DIRS = {"text_encoder": ("text_encoder",), "text_encoder_2": ("text_encoder_2",), "unet": ("unet",),
               "transformer": ("transformer", "condition_lora"), "transformer_cached": ("transformer",),
               "condition_kv": ("transformer", "condition_lora"),
               "vae_encoder": ("vae",), "vae_decoder": ("vae",)}
# Omni-Zero (diffserve.engine.models.omni_zero.checkpoint). The face models ship as ONNX and are not traced.
SOURCE_DIRS.update({"image_encoder": ("image_encoder",), "ip_projection": ("ip_adapter",),
                    "controlnet_unet": ("unet", "controlnet_identity", "controlnet_depth", "ip_adapter"),
                    "depth_estimator": ("depth_estimator",), "face_detector": ("face_analysis",),
                    "face_recognizer": ("face_analysis",)})


class ExportError(RuntimeError):
    pass


def onnx_toolkit() -> str:
    import onnx

    return f"onnx{onnx.__version__}-opset{OPSET}-torch{torch.__version__.split('+')[0]}"


def tensorrt_toolkit() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return None
    return f"trt{tensorrt.__version__}"


def artifact_path(root: Path, component: str, precision: str, toolkit: str, suffix: str = "onnx") -> Path:
    """Where an exported artifact lives: a pure function of (component, precision, toolkit)."""
    return Path(root) / component / f"{precision}-{toolkit}" / f"model.{suffix}"


def source_fingerprint(checkpoint: Path, desc: ComponentDescriptor, precision: str) -> str:
    """Hash of the component's files (name, size, mtime) and its descriptor."""
    h = hashlib.sha256()
    for sub in SOURCE_DIRS[desc.component]:
        src = Path(checkpoint) / sub
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(repr(desc).encode())
    h.update(precision.encode())
    return h.hexdigest()


def _is_current(path: Path, fingerprint: str) -> bool:
    meta = path.with_suffix(".json")
    return path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint


def current_export(desc: ComponentDescriptor, checkpoint: Path, out_root: Path, precision: str) -> ExportResult | None:
    """The up-to-date artifact of ``desc`` under ``out_root`` (traced at ``precision``, or a shipped ONNX
    file copied as fp32), or None: a caller can skip loading the module at all."""
    for p in dict.fromkeys((precision, "fp32")):
        path = artifact_path(out_root, desc.component, p, onnx_toolkit())
        if _is_current(path, source_fingerprint(checkpoint, desc, p)):
            return ExportResult(desc.component, path, skipped=True, seconds=0.0)
    return None


def example_inputs(desc: ComponentDescriptor, which: str = "opt", seed: int = 0,
                   batch: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs of a profile's shapes; token ids stay inside a small vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in desc.inputs:
        shape = list(desc.shape(spec, which))
        if batch is not None and spec.dims and spec.dims[0] == "batch":
            shape[0] = batch
        if spec.dtype == "int64":
            out[spec.name] = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
        elif spec.name == "timestep":
            out[spec.name] = torch.randint(1, 1000, shape, generator=g).float()
        else:
            out[spec.name] = torch.randn(shape, generator=g)
    return out


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm (FLUX's q/k norms) for opset 17, which has no RMSNormalization: computed in float32."""
    from torch.onnx import symbolic_helper as sh

    dims = len(sh._maybe_get_const(normalized_shape, "is"))
    eps = sh._maybe_get_const(eps, "f")
    eps = float(torch.finfo(torch.float32).eps) if sh._is_none(eps) or eps is None else float(eps)
    x32 = g.op("Cast", x, to_i=1)  # 1 = FLOAT
    mean_square = g.op("ReduceMean", g.op("Mul", x32, x32), axes_i=list(range(-dims, 0)), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
    y = g.op("CastLike", g.op("Div", x32, denom), x)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _register_symbolics() -> None:
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)


@dataclass
class ExportResult:
    component: str
    path: Path
    skipped: bool
    seconds: float
    max_abs_diff: float | None = None


def export_component(module: torch.nn.Module | Callable[[], torch.nn.Module], desc: ComponentDescriptor,
                     checkpoint: Path, out_root: Path, precision: str = "fp32", *, verify: bool = True,
                     force: bool = False) -> ExportResult:
    """Trace ``module`` to ONNX under ``out_root``; skip when the artifact is up to date.

    ``module`` may be a loader (a callable returning the module): it is called only when the artifact
    is out of date, and the module it gives is released once the parity check has its torch outputs,
    before the ONNX Runtime session opens — the host then holds one copy of the weights at a time
    (a full-size SD1.5 UNet is 3.4 GB in fp32), not the torch module and the session side by side.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    path = artifact_path(out_root, desc.component, precision, onnx_toolkit())
    fingerprint = source_fingerprint(checkpoint, desc, precision)
    if not force and _is_current(path, fingerprint):
        logger.debug("%s is up to date: %s", desc.component, path)
        return ExportResult(desc.component, path, skipped=True, seconds=0.0)

    if verify and precision == "bf16" and not torch.cuda.is_available():
        raise ExportError(f"{desc.component}: a bf16 ONNX export's parity check needs a GPU (ONNX Runtime's CPU "
                          "provider lacks most bf16 kernels); export on the GPU host, or serve it with --runtime torch")
    t0 = time.perf_counter()
    if path.parent.is_dir():  # the directory belongs to this one artifact: drop stale files
        shutil.rmtree(path.parent)
    path.parent.mkdir(parents=True)
    dtype = DTYPES[precision]
    device = torch.device("cuda" if precision != "fp32" and torch.cuda.is_available() else "cpu")
    owned = not isinstance(module, torch.nn.Module)
    module = (module() if owned else module).to(device, dtype).eval()  # a no-op in its target dtype
    # Trace with batch 2 so no size-1 broadcast is baked into the graph.
    inputs = example_inputs(desc, "opt", batch=min(2, desc.max_batch))
    args = tuple(t.to(device, dtype if t.is_floating_point() and name != "timestep" else t.dtype)
                 for name, t in inputs.items())
    tmp = path.with_suffix(".tmp.onnx")
    _register_symbolics()
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            module, args, str(tmp),
            input_names=list(desc.input_names),
            output_names=list(desc.output_names),
            dynamic_axes=desc.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _log_tracer_warnings(desc.component, caught)
    _finalize_onnx(tmp, path)
    result = ExportResult(desc.component, path, skipped=False, seconds=time.perf_counter() - t0)
    if verify:
        inputs, reference = torch_reference(module, desc, dtype, device)
        if owned:
            del module
            gc.collect()
        result.max_abs_diff, scale = compare_with_reference(path, desc, inputs, reference, device)
        check_parity(desc.component, precision, result.max_abs_diff, scale)
        logger.debug("%s exported in %.1fs, max |onnx - torch| = %.2e", desc.component, result.seconds,
                     result.max_abs_diff)
    path.with_suffix(".json").write_text(json.dumps({
        "component": desc.component, "precision": precision, "toolkit": onnx_toolkit(),
        "fingerprint": fingerprint, "checkpoint": str(checkpoint), "max_abs_diff": result.max_abs_diff,
        "inputs": list(desc.input_names), "outputs": list(desc.output_names),
    }, indent=2))
    return result


def copy_onnx_component(source: Path, desc: ComponentDescriptor, checkpoint: Path, out_root: Path,
                        precision: str = "fp32", *, force: bool = False) -> ExportResult:
    """Install a component that ships as ONNX (the face models) with the descriptor's I/O names.

    The file's inputs and outputs are renamed positionally (e.g. SCRFD's ``input.1`` -> ``image``)
    so every runtime binds it by the same names as a traced component. The weights are not
    converted: such models stay float32 whatever ``precision`` the repository uses.
    """
    import onnx

    path = artifact_path(out_root, desc.component, "fp32", onnx_toolkit())
    fingerprint = source_fingerprint(checkpoint, desc, "fp32")
    if not force and _is_current(path, fingerprint):
        return ExportResult(desc.component, path, skipped=True, seconds=0.0)
    t0 = time.perf_counter()
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != len(desc.inputs) or len(graph.output) != len(desc.outputs):
        raise ExportError(f"{source}: expected {len(desc.inputs)} inputs and {len(desc.outputs)} outputs "
                          f"({', '.join(desc.input_names)} -> {', '.join(desc.output_names)}), the file has "
                          f"{len(inputs)} and {len(graph.output)}")
    renames = {old.name: new for old, new in zip(inputs, desc.input_names)}
    renames.update({old.name: new for old, new in zip(graph.output, desc.output_names)})
    for value in (*inputs, *graph.output):
        value.name = renames[value.name]
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    path.parent.mkdir(parents=True, exist_ok=True)
    for f in path.parent.iterdir():
        f.unlink()
    onnx.save_model(model, str(path))
    result = ExportResult(desc.component, path, skipped=False, seconds=time.perf_counter() - t0)
    result.max_abs_diff = _compare_sessions(source, path, desc)
    path.with_suffix(".json").write_text(json.dumps({
        "component": desc.component, "precision": "fp32", "toolkit": onnx_toolkit(), "fingerprint": fingerprint,
        "checkpoint": str(checkpoint), "source": str(source), "max_abs_diff": result.max_abs_diff,
        "inputs": list(desc.input_names), "outputs": list(desc.output_names), "requested_precision": precision,
    }, indent=2))
    logger.debug("%s installed from %s (inputs/outputs renamed)", desc.component, source)
    return result


def _compare_sessions(source: Path, renamed: Path, desc: ComponentDescriptor) -> float:
    """The renamed copy computes what the original does (names aside)."""
    from diffserve.engine.ort_session import OrtSession

    original, copy = OrtSession(source), OrtSession(renamed)
    feeds = {k: v.numpy() for k, v in example_inputs(desc, "min", seed=1).items()}
    want = original.run(dict(zip(original.input_types, feeds.values())))
    got = copy.run(feeds)
    return max(float(np.abs(got[new] - want[old]).max()) for old, new in zip(original.output_names, desc.output_names))


def _log_tracer_warnings(component: str, caught: list[warnings.WarningMessage]) -> None:
    """The tracer's warnings (about 15 per export: traced Python branches, constant sizes) go to the log."""
    counts: dict[str, int] = {}
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
        counts[text] = counts.get(text, 0) + 1
    for text, n in counts.items():
        logger.debug("%s export: %s%s", component, text, f" (x{n})" if n > 1 else "")


def check_parity(component: str, precision: str, max_abs_diff: float, scale: float = 1.0) -> None:
    """Fail an export whose ONNX output is not finite or differs from torch beyond ``PARITY_TOLERANCE``."""
    limit = PARITY_TOLERANCE[precision] * max(1.0, scale)
    if not math.isfinite(max_abs_diff):
        raise ExportError(f"{component}: the {precision} export's parity check is not finite (max |onnx - torch| "
                          f"= {max_abs_diff}); the network overflows in {precision} (export it in fp32/bf16, or "
                          "use a VAE that is safe in fp16)")
    if max_abs_diff > limit:
        raise ExportError(f"{component}: the {precision} export differs from torch by {max_abs_diff:.3g} "
                          f"(tolerance {limit:.3g}); the traced graph is wrong")


def _finalize_onnx(tmp: Path, path: Path) -> None:
    """Move the traced model into place without reading its weights into memory: a model under protobuf's
    2 GB limit is one file already (renamed); a larger one (its weights in one file per tensor, as the
    tracer writes them) gets its tensors streamed into one ``model.onnx.data`` and only the graph rewritten."""
    import onnx

    model = onnx.load(str(tmp), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        tmp.replace(path)
        return
    data_name = path.name + ".data"
    offset = 0
    with open(path.parent / data_name, "wb") as out:
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            length = int(info["length"]) if "length" in info else None
            with open(tmp.parent / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                copied = _copy_stream(src, out, length)
            pad = -copied % 4096  # page-aligned, so ORT can map each tensor
            out.write(b"\0" * pad)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(copied))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += copied + pad
    onnx.save_model(model, str(path))
    keep = {path.name, data_name}
    for f in path.parent.iterdir():
        if f.name not in keep and f.suffix != ".json":
            f.unlink()


def _copy_stream(src, out, length: int | None, chunk: int = 64 << 20) -> int:
    copied = 0
    while length is None or copied < length:
        block = src.read(chunk if length is None else min(chunk, length - copied))
        if not block:
            break
        out.write(block)
        copied += len(block)
    return copied


def compare_with_torch(module: torch.nn.Module, desc: ComponentDescriptor, path: Path,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       with_scale: bool = False) -> float | tuple[float, float]:
    """Max-abs-diff between ONNX Runtime and torch on fresh random inputs at the profile's min shapes (NaN
    when either output is not finite); with ``with_scale``, also the largest |torch output|."""
    inputs, reference = torch_reference(module, desc, dtype, device)
    diff, scale = compare_with_reference(path, desc, inputs, reference, device)
    return (diff, scale) if with_scale else diff


def torch_reference(module: torch.nn.Module, desc: ComponentDescriptor, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    """The parity check's inputs (random, at the profile's min shapes) and ``module``'s float32 outputs."""
    inputs = example_inputs(desc, "min", seed=1)
    with torch.inference_mode():
        args = [t.to(device, dtype if t.is_floating_point() and n != "timestep" else t.dtype)
                for n, t in inputs.items()]
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return inputs, [r.float().cpu().numpy() for r in ref]


def compare_with_reference(path: Path, desc: ComponentDescriptor, inputs: dict[str, torch.Tensor],
                           reference: list[np.ndarray], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(max |onnx - torch|, max |torch|) of the ONNX model at ``path`` on ``inputs``; NaN when either
    output is not finite."""
    from diffserve.engine.ort_session import OrtSession

    session = OrtSession(path, device="cuda" if torch.device(device).type == "cuda" else "cpu")
    got = session.run({k: v.numpy() for k, v in inputs.items()})
    diff, scale = 0.0, 0.0
    for name, want in zip(desc.output_names, reference):
        have = got[name].astype(np.float32)
        if not (np.isfinite(want).all() and np.isfinite(have).all()):
            return math.nan, scale
        diff = max(diff, float(np.abs(have - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return diff, scale


def tensorrt_fingerprint(onnx_path: Path, desc: ComponentDescriptor, precision: str) -> str:
    """What a TensorRT plan is built from: the ONNX sidecar's source fingerprint (the checkpoint's weight files),
    the graph file and every external data file's bytes hashed by size, mtime and first/last MiB, the
    descriptor and the precision; a fine-tune re-exported over the same architecture gets a new plan."""
    h = hashlib.sha256()
    meta = onnx_path.with_suffix(".json")
    if meta.is_file():
        h.update(json.loads(meta.read_text()).get("fingerprint", "").encode())
    h.update(onnx_path.read_bytes() if onnx_path.stat().st_size < 64 << 20 else b"")
    for f in sorted(p for p in onnx_path.parent.iterdir() if p.name.startswith(onnx_path.name)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    h.update(repr(desc).encode())
    h.update(precision.encode())
    return h.hexdigest()


def build_tensorrt_engine(onnx_path: Path, desc: ComponentDescriptor, out_root: Path, precision: str,
                          force: bool = False) -> Path:
    """Build a TensorRT plan from the ONNX file with the descriptor's min/opt/max profile."""
    toolkit = tensorrt_toolkit()
    if toolkit is None:
        raise ExportError("TensorRT is unavailable: the `tensorrt` package is not installed "
                          "(pip install 'diffserve[tensorrt]' on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        raise ExportError("TensorRT is unavailable: no CUDA GPU is visible on this machine")
    import tensorrt as trt

    plan = artifact_path(out_root, desc.component, precision, toolkit, suffix="plan")
    fingerprint = tensorrt_fingerprint(onnx_path, desc, precision)
    if not force and _is_current(plan, fingerprint):
        return plan
    plan.parent.mkdir(parents=True, exist_ok=True)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for spec in desc.inputs:
        profile.set_shape(spec.name, *(desc.shape(spec, w) for w in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build {desc.component}")
    plan.write_bytes(bytes(serialized))
    plan.with_suffix(".json").write_text(json.dumps({"fingerprint": fingerprint, "onnx": str(onnx_path)}))
    return plan
