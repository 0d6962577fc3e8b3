"""FLUX.1-schnell and OminiControl: our loop equals diffusers' FluxPipeline; the condition path is exact.

The condition path cannot be compared with a diffusers pipeline (there is none), so it is pinned
by identities here — a zero-strength condition with its LoRA off is plain FLUX, the cached mode's
cached and recomputed condition keys/values give the same images, and the input image, the LoRA
scale and the condition itself each change the output — and against an independent reference in
``test_ominicontrol_reference.py``. Every new component exports to ONNX equal to torch.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffserve.engine.catalog import get_model, validate
from diffserve.engine.models.ominicontrol import flux, pipeline as ominicontrol
from diffserve.engine.pipelines import RunControl, run
from tests.devices import torch_components

TOL = 1e-4
PROMPT = "photo of this orange sofa in a modern living room"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def flux_dir(tiny_checkpoints):
    return tiny_checkpoints["ominicontrol"]


@pytest.fixture(scope="module")
def components(flux_dir):
    return torch_components(flux_dir)


@pytest.fixture(scope="module")
def flux_pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def subject():
    """A non-square RGBA picture (the seed page's example input is a PNG) with a bright object."""
    rng = np.random.RandomState(1)
    y, x = np.mgrid[0:96, 0:144]
    rgb = np.stack([x * 1.5, y * 2.5, 255 - x], axis=-1) + rng.randint(0, 40, size=(96, 144, 3))
    rgb[30:70, 50:100] = (240, 120, 20)
    alpha = np.full((96, 144, 1), 255)
    return np.concatenate([rgb, alpha], axis=-1).clip(0, 255).astype(np.uint8)


class CountingComponents:
    """Forwards to real components and counts ``run_component`` calls per component."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: dict[str, int] = {}
        original = inner.run_component

        def counted(component, inputs):
            self.calls[component] = self.calls.get(component, 0) + 1
            return original(component, inputs)

        inner.run_component = counted

    def restore(self):
        del self.inner.run_component


@pytest.mark.parametrize("steps,width,height,images", [(2, 64, 64, 2), (4, 128, 96, 1)])
def test_flux_loop_matches_diffusers_fluxpipeline(components, flux_pipe, steps, width, height, images):
    ours = flux.generate(components, prompt="a photo of the city", width=width, height=height,
                         num_inference_steps=steps, num_images=images, seed=4710825087)
    ref = flux_pipe("a photo of the city", width=width, height=height, num_inference_steps=steps, guidance_scale=0.0,
                    num_images_per_prompt=images, generator=_gen(4710825087), output_type="np",
                    max_sequence_length=components.config.max_sequence_length).images
    assert ours.images.shape == ref.shape == (images, height, width, 3)
    assert np.abs(ours.images - ref).max() <= TOL


def test_zero_strength_condition_with_lora_off_is_plain_flux(components, subject):
    kw = dict(prompt=PROMPT, width=128, height=128, num_inference_steps=3, seed=12467)
    plain = flux.generate(components, **kw).images
    off = ominicontrol.generate(components, image=subject, condition_strength=0.0, lora_scale=0.0, **kw).images
    on = ominicontrol.generate(components, image=subject, **kw).images
    assert np.abs(off - plain).max() <= TOL
    assert np.abs(on - plain).max() > 10 * TOL  # the condition does act at full strength


def test_cached_condition_kv_equals_recomputed_and_is_computed_once(components, subject):
    kw = dict(image=subject, prompt=PROMPT, width=128, height=128, num_inference_steps=4, seed=7,
              condition_mode="cached")
    counter = CountingComponents(components)
    try:
        cached = ominicontrol.generate(components, cache_condition=True, **kw)
        cached_calls = dict(counter.calls)
        counter.calls.clear()
        recomputed = ominicontrol.generate(components, cache_condition=False, **kw)
        recomputed_calls = dict(counter.calls)
        counter.calls.clear()
        joint = ominicontrol.generate(components, **{**kw, "condition_mode": "joint"})
        joint_calls = dict(counter.calls)
    finally:
        counter.restore()
    assert np.abs(cached.images - recomputed.images).max() <= TOL
    assert cached_calls["condition_kv"] == 1 and recomputed_calls["condition_kv"] == 4
    assert cached_calls["transformer_cached"] == recomputed_calls["transformer_cached"] == 4
    assert "condition_kv" in cached.timings
    # The default joint mode runs the condition tokens inside every transformer call instead.
    assert "condition_kv" not in joint_calls and joint_calls["transformer"] == 4
    assert "condition_kv" not in joint.timings


def test_condition_mode_comes_from_the_components_not_the_environment(components, subject, monkeypatch):
    from diffserve.engine.descriptors import needed_components

    kw = dict(image=subject, prompt=PROMPT, width=64, height=64, num_inference_steps=1, seed=2)
    monkeypatch.setenv("DIFFSERVE_OMINICONTROL_CONDITION", "cached")  # no longer read
    assert "condition_kv" not in ominicontrol.generate(components, **kw).timings
    monkeypatch.setattr(components, "condition_mode", "cached")
    assert "condition_kv" in ominicontrol.generate(components, **kw).timings
    spec = [get_model("ominicontrol")]
    assert not {"condition_kv", "transformer_cached"} & set(needed_components(components.config, spec))
    assert {"condition_kv", "transformer_cached"} <= set(needed_components(components.config, spec, "cached"))
    monkeypatch.setattr(components, "condition_mode", "bogus")
    with pytest.raises(ValueError, match="condition_mode"):
        ominicontrol.generate(components, **kw)


def test_input_image_and_lora_scale_change_the_output(components, subject):
    kw = dict(prompt=PROMPT, width=128, height=128, num_inference_steps=3, seed=3)
    base = ominicontrol.generate(components, image=subject, **kw).images
    other = ominicontrol.generate(components, image=255 - subject[..., :3], **kw).images
    no_lora = ominicontrol.generate(components, image=subject, lora_scale=0.0, **kw).images
    assert np.abs(base - other).max() > 10 * TOL
    assert np.abs(base - no_lora).max() > 10 * TOL


def test_condition_branch_is_flux_on_the_condition_tokens_alone_with_the_lora_merged(flux_dir, flux_pipe):
    """An independent reference for ``condition_kv``: diffusers' own transformer, run on the condition
    tokens alone (no text tokens, so attention is among condition tokens only) at timestep 0, with the
    LoRA merged into a copy of its weights; keys and values are read off its attention layers."""
    import copy

    from diffusers.models.embeddings import apply_rotary_emb

    from diffserve.engine.models.ominicontrol.condition import ConditionKVModule, read_condition_lora
    from diffserve.engine.checkpoint import find_condition_lora

    transformer = flux_pipe.transformer
    lora = read_condition_lora(find_condition_lora(flux_dir), transformer)
    g = _gen(0)
    tokens = torch.randn(1, 64, 64, generator=g)
    ids = flux.latent_ids(8, 8, ominicontrol.POSITION_DELTA)
    pooled = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        keys, values = ConditionKVModule(transformer, lora)(tokens, ids[None], pooled, torch.ones(1, 1))

        merged = copy.deepcopy(transformer)
        modules = dict(merged.named_modules())
        for name, (down, up) in lora.items():
            modules[name].weight += up @ down
        seen = {"k": [], "v": []}
        attns = [b.attn for b in list(merged.transformer_blocks) + list(merged.single_transformer_blocks)]
        for attn in attns:
            attn.norm_k.register_forward_hook(lambda m, i, o: seen["k"].append(o))
            attn.to_v.register_forward_hook(lambda m, i, o: seen["v"].append(o))
        merged(hidden_states=tokens, encoder_hidden_states=torch.zeros(1, 0, 32), pooled_projections=pooled,
               timestep=torch.zeros(1), img_ids=ids, txt_ids=torch.zeros(0, 3), return_dict=False)
    rope = merged.pos_embed(ids)
    expected_k = torch.stack([apply_rotary_emb(k, rope, sequence_dim=1) for k in seen["k"]], dim=1)
    expected_v = torch.stack([v.unflatten(-1, (-1, 16)) for v in seen["v"]], dim=1)
    assert keys.shape == expected_k.shape == (1, 4, 64, 2, 16)
    assert (keys - expected_k).abs().max() <= TOL and (values - expected_v).abs().max() <= TOL


def test_condition_image_is_center_cropped_to_512_square(subject):
    square = ominicontrol.center_crop_square(subject, ominicontrol.CONDITION_SIZE)
    assert square.size == (512, 512) and square.mode == "RGB"
    # The centered 96x96 crop of the 144-wide picture (columns 24..119), resized bicubic with PIL
    # directly: computed without the function under test.
    rgb = PIL.Image.fromarray(subject[:, 24:120, :3], "RGB")
    expected = rgb.resize((512, 512), PIL.Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(square), np.asarray(expected))


def test_seed_page_example_runs_through_the_catalog(components, subject):
    params = validate("ominicontrol", {"image": "https://example.invalid/Object+24.png", "prompt": PROMPT, "steps": 8,
                                       "seed": 4710825087, "image_format": "png", "image_quality": 90,
                                       "base64": False})
    seen = []
    out = run("ominicontrol", params | {"image": subject}, components,
              RunControl(on_step=lambda done, total: seen.append((done, total))))
    assert out.images.shape == (1, 512, 512, 3) and out.images.dtype == np.float32
    assert (out.images.min(), out.images.max()) >= (0.0, 0.0) and out.images.max() <= 1.0
    assert out.seed == 4710825087 and out.steps == 8 and seen[-1] == (8, 8) and len(seen) == 8
    assert get_model("ominicontrol").output_size == (512, 512)
    assert set(out.timings) >= {"encode_text", "encode_image", "denoise", "decode", "total"}


def test_lora_file_is_in_the_diffusers_peft_format(flux_dir, flux_pipe, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from diffserve.engine.models.ominicontrol.condition import read_condition_lora
    from diffserve.engine.checkpoint import find_condition_lora

    path = find_condition_lora(flux_dir)
    weights = load_file(path)
    # diffusers reads it as its own format: no key conversion happens.
    state_dict, alphas = flux_pipe.lora_state_dict(str(path.parent), weight_name=path.name, return_alphas=True)
    assert set(state_dict) == set(weights) and not alphas
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert {w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")} == {4}

    transformer = flux_pipe.transformer
    lora = read_condition_lora(path, transformer)
    assert len(lora) == len(weights) // 2 and "x_embedder" in lora
    name = "single_transformer_blocks.0.attn.to_q"
    down, up = weights[f"transformer.{name}.lora_A.weight"], weights[f"transformer.{name}.lora_B.weight"]
    assert torch.equal(lora[name][1], up)  # alpha = rank: scale 1

    # alpha from diffusers' adapter metadata scales the update; text-stream layers are ignored.
    extra = dict(weights)
    extra["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"] = torch.zeros(4, 32)
    extra["transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"] = torch.zeros(32, 4)
    other = tmp_path / "subject.safetensors"
    save_file(extra, str(other), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8})})
    with caplog.at_level("WARNING"):
        scaled = read_condition_lora(other, transformer)
    assert "add_q_proj" not in " ".join(scaled) and "outside the condition branch" in caplog.text
    assert torch.allclose(scaled[name][1], 2 * up) and torch.equal(scaled[name][0], down)

    broken = tmp_path / "broken.safetensors"
    save_file({"transformer.x_embedder.weight": torch.zeros(2, 2)}, str(broken))
    with pytest.raises(ValueError, match="unexpected key"):
        read_condition_lora(broken, transformer)


def test_explicit_lora_path_overrides_the_checkpoint_one(flux_dir, tmp_path):
    from diffserve.engine.runtime_torch import load_component_modules
    from diffserve.engine.models.ominicontrol.tiny import build_condition_lora

    transformer = load_component_modules(flux_dir, components=["transformer"])["transformer"].transformer
    other = build_condition_lora(tmp_path / "other.safetensors", transformer, seed=5)
    default = load_component_modules(flux_dir, components=["condition_kv"])["condition_kv"]
    chosen = load_component_modules(flux_dir, components=["condition_kv"], condition_lora=other)["condition_kv"]
    a, b = (m.lora["x_embedder"].up.weight for m in (default, chosen))
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.fixture(scope="module")
def exported(flux_dir, tmp_path_factory):
    from diffserve.engine.checkpoint import read_architecture
    from diffserve.engine.descriptors import component_descriptors, needed_components
    from diffserve.engine.runtime_torch import load_component_modules
    from diffserve.export.onnx_export import export_component

    config = read_architecture(flux_dir)
    specs = [get_model("ominicontrol")]
    # The default (joint) components, and the cached mode's two as well.
    names = needed_components(config, specs) + ["condition_kv", "transformer_cached"]
    descs = component_descriptors(config, specs)
    modules = load_component_modules(flux_dir, components=names)
    out = tmp_path_factory.mktemp("flux-onnx")
    return {name: export_component(modules[name], descs[name], flux_dir, out / name) for name in names}


def test_every_flux_component_exports_to_onnx_equal_to_torch(exported):
    assert set(exported) == {"text_encoder", "text_encoder_2", "transformer", "condition_kv", "transformer_cached",
                             "vae_encoder", "vae_decoder"}
    for name, result in exported.items():
        assert result.max_abs_diff is not None and result.max_abs_diff <= TOL, (name, result.max_abs_diff)


def test_ominicontrol_runs_the_same_through_onnx_runtime(components, flux_dir, exported, subject):
    from diffserve.engine.runtime_onnx import OnnxComponents

    onnx = OnnxComponents(flux_dir, {name: r.path for name, r in exported.items()})
    kw = dict(image=subject, prompt=PROMPT, width=128, height=128, num_inference_steps=2, seed=11)
    for mode in ("joint", "cached"):
        ours = ominicontrol.generate(components, condition_mode=mode, **kw).images
        via_onnx = ominicontrol.generate(onnx, condition_mode=mode, **kw).images
        assert np.abs(ours - via_onnx).max() <= TOL, mode


def test_ominicontrol_batches_through_onnx_runtime(flux_dir, exported, subject, monkeypatch):
    """Step batching on the ONNX transformers (dynamic batch axis): three requests (different seeds, step
    counts, samples, condition images, lora scales, strengths) share calls and each equals its image alone
    within TOL, in both condition modes (as ``test_batched_ominicontrol.py`` for torch; condition images
    encoded at 128² to stay fast)."""
    import functools
    import threading
    import time

    from diffserve.engine.batching import BatchingOptions, StepBatcher
    from diffserve.engine.runtime_onnx import OnnxComponents

    monkeypatch.setattr(ominicontrol, "encode_condition", functools.partial(ominicontrol.encode_condition, size=128))

    onnx = OnnxComponents(flux_dir, {name: r.path for name, r in exported.items()})
    conditions = [subject, 255 - subject[..., :3], subject[::-1, ::2]]
    requests = [dict(seed=1, num_inference_steps=2, num_images=1),
                dict(seed=2, num_inference_steps=3, num_images=2, lora_scale=0.5, condition_strength=0.5),
                dict(seed=3, num_inference_steps=2, num_images=1, condition_strength=0.0)]

    def generate(i, mode, control):
        return ominicontrol.generate(onnx, image=conditions[i], prompt=f"{PROMPT} {i}", width=64, height=64,
                                     condition_mode=mode, control=control, **requests[i]).images

    for mode in ("joint", "cached"):
        batcher = StepBatcher(onnx.transformer, BatchingOptions(max_batch=8), start_thread=False)
        results, errors = {}, []

        def call(i):
            try:
                results[i] = generate(i, mode, RunControl(driver=batcher.run))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        while len(batcher.scheduler.waiting) < 3 and not errors:  # all joined: tick
            time.sleep(0.001)
        while any(t.is_alive() for t in threads):
            if not batcher.tick():
                time.sleep(0.001)
        assert not errors, errors
        assert batcher.calls == [4, 4, 2], mode
        for i in range(3):
            alone = generate(i, mode, RunControl())
            assert np.abs(results[i] - alone).max() <= TOL, (mode, i)
