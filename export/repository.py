"""Build a Triton model repository from local diffusers checkpoints or a models file.

For each checkpoint: one python-backend component model per network it serves
(``<key>_text_encoder``, ``<key>_unet``, ...), with the exported artifact in its version
directory and dynamic batching. For each slug: a decoupled pipeline model named as the slug
(Triton accepts ``.`` and ``-`` in model names) in the first requested mode, plus
``<slug>__<mode>`` for each further mode. Every ``config.pbtxt`` is generated from the
catalog and the component descriptors, its ``parameters`` from the typed dataclasses of
``diffserve.triton_serving.stub_params``. ``export_components`` is the one export loop over a checkpoint's
components (the engine benchmark uses it too); it and the model writing log one line per
checkpoint and per slug. ``repository.json`` records what was built, for the server launcher
and the API, and which configured slugs were left out and why (``deployments_from_config``:
a ``models.toml`` checked and materialized by ``diffserve.engine.models_file``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffserve
from diffserve.engine import home_dir
from diffserve.engine.catalog import CATALOG, ModelSpec, get_model
from diffserve.engine.checkpoint import read_architecture
from diffserve.engine.descriptors import ComponentDescriptor, component_descriptors, needed_components
from diffserve.engine.options import PRECISIONS, BatchingOptions, EngineOptions, default_precision, network_precisions
from diffserve.export.onnx_export import (
    ExportError, ExportResult, build_tensorrt_engine, copy_onnx_component, current_export, export_component,
    tensorrt_toolkit,
)
from diffserve.triton_serving.manifest import MANIFEST
from diffserve.triton_serving.stub_params import (
    COMPONENT_RUNTIMES, FUSED_RUNTIMES, PIPELINE_MODES, ComponentModelParams, PipelineModelParams,
)

logger = logging.getLogger(__name__)

TEMPLATES = diffserve.TEMPLATES  # the Triton stubs: model_repository/templates, or diffserve/templates installed
RUNTIMES = COMPONENT_RUNTIMES
MODES = PIPELINE_MODES
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "uint8": "TYPE_UINT8", "bytes": "TYPE_STRING"}


@dataclass(frozen=True)
class Deployment:
    """One served slug and the local checkpoint directory that serves it."""

    slug: str
    checkpoint: Path
    key: str = ""
    """Prefix of the component model names; slugs sharing a checkpoint share a key (and models)."""

    def __post_init__(self) -> None:
        get_model(self.slug)  # unknown slugs fail here
        if not self.key:
            object.__setattr__(self, "key", re.sub(r"[^A-Za-z0-9_]", "_", self.slug))


@dataclass
class RepositoryOptions:
    runtime: str = "onnxruntime"
    modes: tuple[str, ...] = ("bls", "fused")
    precision: str = ""
    """Precision of the denoisers and text encoders; empty: ``diffserve.engine.options.default_precision`` per family and
    device (fp32 on CPU; fp16 for SD, bf16 for FLUX on CUDA). The VAE stays fp32 where its config forces upcast."""
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    """With ``device=cuda``: the GPUs to spread instances over (each fused pipeline model gets ``pipeline_instances``
    instances on every GPU named; default: GPU 0). Building needs no GPU: only the configs name them."""
    pipeline_instances: int = 2
    """Instances of each fused pipeline model per device (each is one copy of the slug's weights)."""
    component_instances: int = 1
    max_queue_delay_us: int = 2000
    fused_runtime: str = "onnxruntime"
    torch_optimizations: str = ""
    """``diffserve.engine.torch_optimize`` spec for torch component models and torch fused pipelines."""
    ominicontrol_condition: str = "joint"
    ort_arena: bool = False
    ort_threads: int = 0
    batching: bool = True
    """Step-level batching in each fused pipeline instance (``EngineOptions.batching``): one instance takes
    ``max_batch`` requests in flight. bls pipelines run one request per instance (their UNet model's dynamic
    batcher merges steps instead)."""
    max_batch: int = 8
    batch_buckets: tuple[int, ...] = ()
    force: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.fused_runtime not in FUSED_RUNTIMES:
            raise ValueError(f"fused_runtime must be one of {', '.join(FUSED_RUNTIMES)}")
        if self.precision and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.gpus and not self.device.startswith("cuda"):
            raise ValueError("gpus are for --device cuda")
        if self.device.startswith("cuda") and not self.gpus:
            self.gpus = (int(self.device.partition(":")[2] or 0),)
        self.gpus = tuple(int(g) for g in self.gpus)
        self.batch_buckets = tuple(int(b) for b in self.batch_buckets)
        BatchingOptions(max_batch=self.max_batch, buckets=self.batch_buckets)  # refuse bad limits before exporting
        from diffserve.engine.torch_optimize import TorchOptimizations

        self.torch_optimizations = TorchOptimizations.parse(self.torch_optimizations).spec()

    def engine_options(self, checkpoint: Path, family: str, components: list[str]) -> EngineOptions:
        """The options of one checkpoint's models: each network's precision (``network_precisions``) and the
        device, torch and ORT settings of this repository."""
        device = "cuda" if self.device.startswith("cuda") else "cpu"
        precisions = network_precisions(checkpoint, family, components, device, self.precision or None)
        return EngineOptions(device=device, precisions=precisions,
                             precision=self.precision or default_precision(family, device),
                             ominicontrol_condition=self.ominicontrol_condition,
                             torch_optimizations=self.torch_optimizations, ort_arena=self.ort_arena,
                             ort_threads=self.ort_threads, batching=self.batching, max_batch=self.max_batch,
                             batch_buckets=tuple(self.batch_buckets))

    def batch_capacity(self, slug: str, mode: str) -> int:
        """Requests one pipeline model works on at once: each fused instance takes ``max_batch`` of a slug it
        step-batches (``diffserve.engine.batching.PipelineRunner.capacity``), any other instance one."""
        instances = self.pipeline_instances * (len(self.gpus) if mode == "fused" and self.gpus else 1)
        if mode == "fused" and self.batching:
            from diffserve.engine.pipelines import step_batched

            if step_batched(slug):
                return instances * self.max_batch
        return instances


@dataclass
class RepositoryReport:
    repository: Path
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """pipeline model name -> {slug, mode, depends_on}"""
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    """component model name -> {component, runtime, artifact, skipped, seconds, max_abs_diff}"""
    unavailable: dict[str, list[str]] = field(default_factory=dict)
    """slug -> why it is not in the repository (its artifacts failed ``diffserve models check``)"""

    def default_model(self, slug: str) -> str:
        for name, info in self.pipelines.items():
            if info["slug"] == slug and info["default"]:
                return name
        raise KeyError(slug)


# -- config.pbtxt ----------------------------------------------------------------------------------

def _pbtxt(value: Any, indent: int = 0) -> str:
    """Protobuf text format for nested dicts/lists of scalars (what config.pbtxt needs)."""
    pad = "  " * indent
    lines = []
    for key, val in value.items():
        items = val if isinstance(val, list) and val and isinstance(val[0], dict) else [val]
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{\n{_pbtxt(item, indent + 1)}{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, str) and (v.startswith("TYPE_") or v.startswith("KIND_")):
        return v
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def component_config(name: str, desc: ComponentDescriptor, params: ComponentModelParams,
                     opts: RepositoryOptions) -> str:
    """A component model: batched ones get dynamic batching with the batch axis implicit; an
    unbatched one (``max_batch_size: 0``, e.g. the face detector) lists its full shapes."""
    skip = 1 if desc.batched else 0

    def tensors(specs):
        out = []
        for t in specs:
            dims = [d if isinstance(d, int) else -1 for d in t.dims[skip:]] or [1]
            out.append({"name": t.name, "data_type": _TRITON_TYPES[t.dtype], "dims": dims})
        return out

    warmup_inputs = []
    for t in desc.inputs:
        dims = list(desc.shape(t, "min")[skip:]) or [1]  # cheap: loads the session, keeps no big arena
        warmup_inputs.append({"key": t.name, "value": {"data_type": _TRITON_TYPES[t.dtype], "dims": dims,
                                                       "zero_data": True}})
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": desc.max_batch if desc.batched else 0,
        "input": tensors(desc.inputs),
        "output": tensors(desc.outputs),
        "instance_group": _instance_groups(opts.component_instances, opts),
        "parameters": params.to_parameters(),
        # The smallest batch the graph takes (the depth model's traced graph only takes 2).
        "model_warmup": [{"name": "zeros", "batch_size": desc.profile["batch"][0] if desc.batched else 1,
                          "inputs": warmup_inputs}],
    }
    if desc.batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    return _pbtxt(config)


def pipeline_config(name: str, params: PipelineModelParams, opts: RepositoryOptions) -> str:
    spec = get_model(params.slug)
    inputs = [{"name": "REQUEST", "data_type": "TYPE_STRING", "dims": [1]}]
    inputs += [{"name": p, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3], "optional": True}
               for p in spec.image_params]
    outputs = [
        {"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, 3]},
        {"name": "IMAGES_FLOAT", "data_type": "TYPE_FP32", "dims": [-1, -1, -1, 3]},
        {"name": "SEED", "data_type": "TYPE_INT64", "dims": [1]},
        {"name": "INFO", "data_type": "TYPE_STRING", "dims": [1]},
        {"name": "PROGRESS", "data_type": "TYPE_INT32", "dims": [2]},
    ]
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": inputs,
        "output": outputs,
        # A bls pipeline holds no weights (its loop calls the component models): CPU instances.
        "instance_group": (_instance_groups(opts.pipeline_instances, opts) if params.mode == "fused"
                           else [{"count": opts.pipeline_instances, "kind": "KIND_CPU"}]),
        "parameters": params.to_parameters(),
    }
    return _pbtxt(config)


def _instance_groups(count: int, opts: RepositoryOptions) -> list[dict[str, Any]]:
    """``count`` instances on the CPU, or on each GPU of ``opts.gpus`` (Triton hands each instance its
    ``model_instance_device_id``; the stubs run on ``cuda:<id>``)."""
    if not opts.device.startswith("cuda"):
        return [{"count": count, "kind": "KIND_CPU"}]
    return [{"count": count, "kind": "KIND_GPU", "gpus": [gpu]} for gpu in opts.gpus]


def _install_model(model_dir: Path, template: str, config: str) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / template / "model.py", version / "model.py")
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")


# -- build -----------------------------------------------------------------------------------------

@dataclass
class ExportedComponent:
    onnx: ExportResult
    """The ONNX file (traced, or a renamed copy of a component that ships as ONNX)."""
    artifact: Path
    """What the runtime loads: the ONNX file, or the TensorRT plan built from it."""


def _export_one(checkpoint: Path, component: str, desc: ComponentDescriptor, root: Path, precision: str, module: Any | None,
                *, verify: bool, force: bool) -> ExportResult:
    """Export one component; without ``module``, loaded here in its target dtype (no fp32 copy of an fp16 or
    bf16 network) and handed to ``export_component`` to own, so it is freed before the parity check opens
    its ONNX Runtime session. One network is in memory at a time."""
    loaded = module is None
    if loaded:
        from diffserve.engine.runtime_torch import DTYPES, load_component_modules

        module = load_component_modules(checkpoint, DTYPES[precision], components=[component])[component]
    source = getattr(module, "onnx_source", None)
    if source is not None:  # ships as ONNX (face models): copied with renamed I/O
        return copy_onnx_component(source, desc, checkpoint, root, precision, force=force)
    if loaded:  # hand over the only reference: export_component frees the module before its parity session
        handoff = [module]
        del module
        return export_component(handoff.pop, desc, checkpoint, root, precision, verify=verify, force=force)
    return export_component(module, desc, checkpoint, root, precision, verify=verify, force=force)


def export_components(checkpoint: Path, specs: list[ModelSpec], out_dir: Callable[[str], Path],
                      precision: str | dict[str, str], *, modules: dict[str, Any] | None = None,
                      tensorrt: bool = False, verify: bool = True, force: bool = False, label: str = "",
                      condition_mode: str = "joint") -> dict[str, ExportedComponent]:
    """Export every component that ``specs`` need from ``checkpoint`` (cached by source fingerprint).

    ``out_dir(component)`` is the directory its artifacts go under; ``precision`` is one precision for every
    network or ``{component: precision}`` (``diffserve.engine.options.network_precisions``); ``modules`` are the torch
    modules to trace (default: loaded from the checkpoint). Logs one line for the whole set.
    """
    checkpoint = Path(checkpoint)
    config = read_architecture(checkpoint)
    descs = component_descriptors(config, specs)
    names = needed_components(config, specs, condition_mode)
    precisions = precision if isinstance(precision, dict) else dict.fromkeys(names, precision)
    t0 = time.perf_counter()
    out: dict[str, ExportedComponent] = {}
    for component in names:
        root = out_dir(component)
        result = None if force else current_export(descs[component], checkpoint, root, precisions[component])
        if result is None:
            result = _export_one(checkpoint, component, descs[component], root, precisions[component],
                                 None if modules is None else modules[component], verify=verify, force=force)
        artifact = result.path
        if tensorrt:
            artifact = build_tensorrt_engine(result.path, descs[component], root, precisions[component], force)
        out[component] = ExportedComponent(result, artifact)
    fresh = sum(not e.onnx.skipped for e in out.values())
    state = "cached" if not fresh else f"{fresh} exported in {time.perf_counter() - t0:.1f} s"
    logger.info("export %s: %d components (%s)", label or checkpoint.name, len(out), state)
    return out


def build_repository(repository: str | Path, deployments: list[Deployment],
                     opts: RepositoryOptions | None = None,
                     unavailable: dict[str, list[str]] | None = None) -> RepositoryReport:
    """Export every needed component and write all model directories and configs.

    ``unavailable`` (slug -> problems, from ``deployments_from_config``) is recorded in the manifest,
    so a server on the repository can say why those slugs are not served.
    """
    opts = opts or RepositoryOptions()
    repo = Path(repository).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    report = RepositoryReport(repository=repo)
    if opts.runtime == "tensorrt" and tensorrt_toolkit() is None:
        raise ExportError("TensorRT is unavailable here (no `tensorrt` package); use --runtime onnxruntime")

    engine_by_slug: dict[str, dict[str, Any]] = {}
    by_key: dict[str, list[Deployment]] = {}
    for d in deployments:
        by_key.setdefault(d.key, []).append(d)

    for key, group in by_key.items():
        checkpoints = {d.checkpoint.resolve() for d in group}
        if len(checkpoints) != 1:
            raise ValueError(f"deployments with key {key!r} point at different checkpoints: {checkpoints}")
        checkpoint = checkpoints.pop()
        config = read_architecture(checkpoint)
        specs = [get_model(d.slug) for d in group]
        descs = component_descriptors(config, specs)
        names = needed_components(config, specs, opts.ominicontrol_condition)
        engine_options = opts.engine_options(checkpoint, config.family, names)
        model_names = {component: f"{key}_{component}" for component in names}
        exported: dict[str, ExportedComponent] = {}
        # Component models exist only for bls (each holds a copy of its network's weights); fused pipelines
        # with ONNX Runtime load the exported files themselves.
        serve_components = "bls" in opts.modes
        if (serve_components and opts.runtime != "torch") or ("fused" in opts.modes
                                                              and opts.fused_runtime == "onnxruntime"):
            # Without component models the files live in the first pipeline model's directory, where Triton
            # ignores a non-numeric sub-directory (a directory of its own would be polled as a model).
            artifact_dir = ((lambda c: repo / model_names[c] / "1") if serve_components
                            else (lambda c: repo / group[0].slug / "artifacts" / model_names[c]))
            exported = export_components(checkpoint, specs, artifact_dir,
                                         engine_options.precisions, force=opts.force,
                                         tensorrt=serve_components and opts.runtime == "tensorrt",
                                         label=", ".join(d.slug for d in group),
                                         condition_mode=opts.ominicontrol_condition)
        for component, model_name in model_names.items() if serve_components else ():
            version = repo / model_name / "1"
            info: dict[str, Any] = {"component": component, "runtime": opts.runtime,
                                    "precision": engine_options.precision_of(component)}
            artifact = ""
            if component in exported:
                result = exported[component].onnx
                artifact = str(exported[component].artifact.relative_to(version))
                info.update(artifact=artifact, skipped=result.skipped, seconds=round(result.seconds, 3),
                            max_abs_diff=result.max_abs_diff)
            params = ComponentModelParams(component=component, runtime=opts.runtime, checkpoint=str(checkpoint),
                                          options=engine_options.to_dict(), artifact=artifact)
            _install_model(repo / model_name, "component", component_config(model_name, descs[component], params, opts))
            report.components[model_name] = info

        onnx_files = {c: str(e.onnx.path) for c, e in exported.items()}
        for d in group:
            for i, mode in enumerate(opts.modes):
                name = d.slug if i == 0 else f"{d.slug}__{mode}"
                params = PipelineModelParams(slug=d.slug, mode=mode, checkpoint=str(checkpoint),
                                             components=model_names, fused_runtime=opts.fused_runtime,
                                             artifacts=onnx_files, options=engine_options.to_dict())
                _install_model(repo / name, "pipeline", pipeline_config(name, params, opts))
                report.pipelines[name] = {
                    "slug": d.slug, "mode": mode, "default": i == 0,
                    "depends_on": sorted(model_names.values()) if mode == "bls" else [],
                    "precisions": engine_options.precisions,
                    "devices": ([f"cuda:{g}" for g in opts.gpus] if opts.device.startswith("cuda") and mode == "fused"
                                else ["cpu"]),
                    "batch_capacity": opts.batch_capacity(d.slug, mode),
                }
            engine_by_slug[d.slug] = engine_options.to_dict()
            logger.info("models %s: %s (%s)", d.slug, ", ".join(opts.modes),
                        ", ".join(f"{c} {p}" for c, p in engine_options.precisions.items()))

    report.unavailable = dict(unavailable or {})
    manifest = {"pipelines": report.pipelines, "components": report.components, "unavailable": report.unavailable,
                "options": {k: v for k, v in asdict(opts).items() if k != "force"},
                "engine_options": engine_by_slug}
    (repo / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    logger.info("model repository ready in %s: %d pipeline and %d component models", repo, len(report.pipelines),
                len(report.components))
    return report


TRITON_SLUGS = tuple(CATALOG)
"""Slugs the repository builder serves (every slug of the catalog) and the Triton tests cover."""


def shared_deployments(checkpoints: dict[str, Path], cache_root: Path | None = None,
                       keys: dict[str, str] | None = None) -> list[Deployment]:
    """One deployment per slug, keyed by the content of its checkpoint: slugs whose checkpoints hold the
    same files (the demo's two SD1.5 slugs: one single file and the diffusers folder it was written
    from) share one checkpoint and one set of component models."""
    from diffserve.engine.models_file import content_digest

    first_by_digest: dict[str, tuple[str, Path]] = {}
    out = []
    for slug, path in checkpoints.items():
        if slug not in TRITON_SLUGS:
            continue
        digest = content_digest(path, cache_root)
        owner, shared = first_by_digest.setdefault(digest, (slug, Path(path)))
        key = (keys or {}).get(owner) or re.sub(r"[^A-Za-z0-9_]", "_", owner)
        out.append(Deployment(slug=slug, checkpoint=shared, key=key))
    return out


def demo_deployments(checkpoints: dict[str, Path]) -> list[Deployment]:
    """Tiny checkpoints keyed by their content, so the two SD1.5 slugs share component models (named
    ``tiny_sd15_*`` etc., as the tests and benchmarks know them)."""
    return shared_deployments(checkpoints, keys=DEMO_KEYS)


DEMO_KEYS = {slug: spec.family.demo_key(spec) for slug, spec in CATALOG.items()}
"""Slug -> the demo deployment's key (``ModelFamily.demo_key``: ``tiny_sd15``, ``tiny_sdxl``,
``tiny_omni_zero``, ``tiny_flux``): the component model names the tests and benchmarks know."""


def deployments_from_config(config, cache_root: Path | None = None) -> tuple[list[Deployment], dict[str, list[str]]]:
    """Deployments of the complete slugs of a models file (``diffserve.engine.models_file``), materialized,
    and ``{slug: [problem, ...]}`` of the slugs left out — the check ``diffserve models check`` runs."""
    from diffserve.engine.models_file import prepare

    prepared = prepare(config, cache_root)
    return shared_deployments(prepared.checkpoints, cache_root), prepared.unavailable()


def default_demo_repository() -> Path:
    return home_dir() / "demo_repository"


DEMO_OPTIONS = {"modes": ("fused", "bls"), "pipeline_instances": 1}
"""The demo serves each slug's step-batching fused model under the slug's own name, as a deployment does,
and keeps the bls models beside it (``<slug>__bls``) to show that mode; one instance per pipeline model:
the demo runs on CPU hosts, where ~35 python stubs is plenty."""


def build_demo_repository(repository: Path | None = None, slugs: tuple[str, ...] | None = None,
                          **options) -> RepositoryReport:
    """Tiny checkpoints for every slug (or only ``slugs``), exported into a repository (seconds, cached)."""
    from diffserve.engine.tiny.demo import demo_checkpoints

    repo = repository or default_demo_repository()
    checkpoints = {s: p for s, p in demo_checkpoints().items() if slugs is None or s in slugs}
    return build_repository(repo, demo_deployments(checkpoints), RepositoryOptions(**(DEMO_OPTIONS | options)))
