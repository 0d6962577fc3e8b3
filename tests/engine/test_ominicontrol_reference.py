"""OminiControl's default (joint) condition mode against an independent reference implementation.

The reference is written here from Yuanshi9815/OminiControl's ``transformer_forward`` as shipped
(``generate(kv_cache=False)``): text, image and condition tokens are three branches; every branch's
queries attend to the keys of all three in one attention; the condition branch uses the
image-stream weights with the subject LoRA merged in (on its rows only), timestep 0, and each
branch its own AdaLN modulation. It shares no code with ``diffserve.engine.models.ominicontrol.condition``. The cached
(independent-condition) mode's gap and speed-up are measured and printed (``-s``) for the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffserve.engine.components import ConditionTokens
from diffserve.engine.models.ominicontrol import pipeline as ominicontrol
from tests.devices import torch_components

TOL = 1e-4
PROMPT = "photo of this orange sofa in a modern living room"


@pytest.fixture(scope="module")
def flux_dir(tiny_checkpoints):
    return tiny_checkpoints["ominicontrol"]


@pytest.fixture(scope="module")
def components(flux_dir):
    return torch_components(flux_dir)


@pytest.fixture(scope="module")
def subject():
    rng = np.random.RandomState(1)
    rgb = rng.randint(0, 255, size=(96, 144, 3))
    rgb[30:70, 50:100] = (240, 120, 20)
    return rgb.astype(np.uint8)


def _lora_deltas(flux_dir) -> dict[str, torch.Tensor]:
    """``{module path: up @ down}`` read straight from the PEFT file (the tiny LoRA has no alpha: scale 1)."""
    from safetensors.torch import load_file

    files = sorted((flux_dir / "condition_lora").glob("*.safetensors"))
    weights = load_file(str(files[0]))
    out = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[name] = weights[key.replace("lora_A", "lora_B")] @ weights[key]
    return out


def reference_forward(tr, deltas, latents, sigma, text, pooled, img_ids, txt_ids, cond, cond_ids):
    """The reference's three-branch FLUX forward, one joint attention per block."""
    from diffusers.models.embeddings import apply_rotary_emb

    def lin(name, module, x, on_condition):
        weight = module.weight + (deltas[name] if on_condition and name in deltas else 0)
        return F.linear(x, weight, module.bias)

    def ln(x):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)

    def heads(x, n):
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)  # [B, H, S, D]

    gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    temb = tr.time_text_embed(sigma * 1000, pooled)
    temb_c = tr.time_text_embed(torch.zeros_like(sigma), pooled)
    rope = tr.pos_embed(torch.cat([txt_ids, img_ids, cond_ids], dim=0))
    x = tr.x_embedder(latents)
    c = lin("x_embedder", tr.x_embedder, cond, True)
    e = tr.context_embedder(text)
    T, N = e.shape[1], x.shape[1]

    def attention(attn, qs, ks, vs):
        q = apply_rotary_emb(torch.cat(qs, dim=2), rope)
        k = apply_rotary_emb(torch.cat(ks, dim=2), rope)
        out = F.scaled_dot_product_attention(q, k, torch.cat(vs, dim=2))
        out = out.transpose(1, 2).flatten(2)
        return out[:, :T], out[:, T:T + N], out[:, T + N:]

    for i, blk in enumerate(tr.transformer_blocks):
        p, a, h = f"transformer_blocks.{i}", blk.attn, blk.attn.heads
        mx = lin(f"{p}.norm1.linear", blk.norm1.linear, F.silu(temb), False).chunk(6, dim=1)
        me = blk.norm1_context.linear(F.silu(temb)).chunk(6, dim=1)
        mc = lin(f"{p}.norm1.linear", blk.norm1.linear, F.silu(temb_c), True).chunk(6, dim=1)
        mod = lambda v, m, o=0: ln(v) * (1 + m[o + 1][:, None]) + m[o][:, None]  # noqa: E731
        hx, he, hc = mod(x, mx), mod(e, me), mod(c, mc)
        qs = [a.norm_added_q(heads(a.add_q_proj(he), h))] + [
            a.norm_q(heads(lin(f"{p}.attn.to_q", a.to_q, v, on), h)) for v, on in ((hx, False), (hc, True))]
        ks = [a.norm_added_k(heads(a.add_k_proj(he), h))] + [
            a.norm_k(heads(lin(f"{p}.attn.to_k", a.to_k, v, on), h)) for v, on in ((hx, False), (hc, True))]
        vs = [heads(a.add_v_proj(he), h)] + [heads(lin(f"{p}.attn.to_v", a.to_v, v, on), h)
                                             for v, on in ((hx, False), (hc, True))]
        oe, ox, oc = attention(a, qs, ks, vs)
        e = e + me[2][:, None] * a.to_add_out(oe)
        e = e + me[5][:, None] * blk.ff_context(mod(e, me, 3))
        new = []
        for v, m, o, on in ((x, mx, ox, False), (c, mc, oc, True)):
            v = v + m[2][:, None] * lin(f"{p}.attn.to_out.0", a.to_out[0], o, on)
            f = gelu(lin(f"{p}.ff.net.0.proj", blk.ff.net[0].proj, mod(v, m, 3), on))
            new.append(v + m[5][:, None] * lin(f"{p}.ff.net.2", blk.ff.net[2], f, on))
        x, c = new

    main = torch.cat([e, x], dim=1)
    for j, blk in enumerate(tr.single_transformer_blocks):
        p, a, h = f"single_transformer_blocks.{j}", blk.attn, blk.attn.heads
        branches = []
        for v, emb, on in ((main, temb, False), (c, temb_c, True)):
            shift, scale, gate = lin(f"{p}.norm.linear", blk.norm.linear, F.silu(emb), on).chunk(3, dim=1)
            hv = ln(v) * (1 + scale[:, None]) + shift[:, None]
            branches.append((v, hv, gate, on))
        qs = [a.norm_q(heads(lin(f"{p}.attn.to_q", a.to_q, hv, on), h)) for _, hv, _, on in branches]
        ks = [a.norm_k(heads(lin(f"{p}.attn.to_k", a.to_k, hv, on), h)) for _, hv, _, on in branches]
        vs = [heads(lin(f"{p}.attn.to_v", a.to_v, hv, on), h) for _, hv, _, on in branches]
        oe, ox, oc = attention(a, qs, ks, vs)
        outs = (torch.cat([oe, ox], dim=1), oc)
        new = []
        for (v, hv, gate, on), o in zip(branches, outs):
            mlp = gelu(lin(f"{p}.proj_mlp", blk.proj_mlp, hv, on))
            new.append(v + gate[:, None] * lin(f"{p}.proj_out", blk.proj_out, torch.cat([o, mlp], dim=2), on))
        main, c = new
    return tr.proj_out(tr.norm_out(main[:, T:], temb))


class ReferenceComponents:
    """Real components whose joint-mode ``transformer`` call runs ``reference_forward`` instead."""

    def __init__(self, inner, deltas):
        self.inner, self.deltas = inner, deltas
        self.transformer_module = inner.modules["transformer"].transformer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @torch.no_grad()
    def transformer(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                    condition=None):
        assert isinstance(condition, ConditionTokens) and float(condition.bias.max()) == 0.0
        assert float(condition.lora_scale.min()) == 1.0
        return reference_forward(self.transformer_module, self.deltas, hidden_states, timestep,
                                 encoder_hidden_states, pooled_projections, img_ids, txt_ids, condition.latents,
                                 condition.ids)


def test_joint_transformer_call_equals_the_reference(components, flux_dir):
    module = components.modules["transformer"]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 64, generator=g), torch.tensor([0.7, 0.3]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 32, generator=g))
    from diffserve.engine.models.ominicontrol import flux

    img_ids, txt_ids = flux.latent_ids(4, 4), torch.zeros(7, 3)
    cond, cond_ids = torch.randn(2, 16, 64, generator=g), flux.latent_ids(4, 4, ominicontrol.POSITION_DELTA)
    with torch.no_grad():
        ours = module(*args, img_ids[None].expand(2, -1, -1), txt_ids[None].expand(2, -1, -1), cond,
                      cond_ids[None].expand(2, -1, -1), torch.ones(2, 1), torch.zeros(2, 1))
        ref = reference_forward(module.transformer, _lora_deltas(flux_dir), *args, img_ids, txt_ids, cond, cond_ids)
    assert ours.shape == ref.shape == (2, 16, 64)
    assert (ours - ref).abs().max() <= TOL
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


def test_default_pipeline_equals_the_reference_and_cached_mode_differs(components, flux_dir, subject):
    # Speed of the two condition modes is a benchmark's business (benchmarks/engine_bench.py), not this test's.
    kw = dict(image=subject, prompt=PROMPT, width=128, height=128, num_inference_steps=4, seed=7)
    ref = ominicontrol.generate(ReferenceComponents(components, _lora_deltas(flux_dir)), **kw).images
    joint = ominicontrol.generate(components, condition_mode="joint", **kw).images
    cached = ominicontrol.generate(components, condition_mode="cached", **kw).images
    default = ominicontrol.generate(components, **kw).images
    plain = ominicontrol.generate(components, condition_strength=0.0, lora_scale=0.0, **kw).images
    assert np.array_equal(default, joint)  # joint is the default
    assert float(np.abs(joint - ref).max()) <= TOL
    assert float(np.abs(cached - ref).max()) > 10 * TOL  # the independent condition is another attention model
    assert float(np.abs(ref - plain).max()) > 10 * TOL  # the condition changes the image
