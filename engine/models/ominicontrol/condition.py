"""FLUX torch modules for OminiControl's condition tokens: the condition branch, its LoRA, the joint attention.

OminiControl (Tan et al. 2024) feeds a VAE-encoded condition image to FLUX as extra tokens. They
run through every block with the *image-stream* weights plus a subject LoRA that acts on them
alone (``x_embedder``, the AdaLN modulation ``norm1.linear`` / ``norm.linear``, attention
``to_q``/``to_k``/``to_v``/``to_out.0``, the MLP projections), with timestep 0 and their own RoPE
ids.

Two attention modes, chosen by the caller:

* **joint** (``FluxTransformerModule`` with condition tokens; the default): one attention over
  text, image and condition tokens in every block, for every query — what the reference
  generation code does as shipped (Yuanshi9815/OminiControl ``generate(kv_cache=False)``) and how
  the subject LoRA was trained (``union_cond_attn: true``, ``independent_condition: false``).
  The condition tokens see the noisy image, so the whole branch runs at every step.
* **cached** (``ConditionKVModule`` + ``FluxCachedConditionTransformerModule``): the reference's
  optional independent condition (``kv_cache=True``): condition tokens attend only to themselves,
  so their per-block keys/values depend on the condition image and pooled prompt alone and are
  computed once per request. Faster, but *not* what the LoRA was trained for: images differ.

A ``condition_bias`` of ``log(strength)`` is added to the attention logits between condition and
non-condition tokens (the older reference's ``condition_scale``); ``-inf`` switches the condition
off exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Linear layers on the condition tokens' path that a subject LoRA may adapt (module paths in
# FluxTransformer2DModel). The reference subject LoRA targets all of these except ff.net.0.proj.
_DOUBLE_BLOCK_LINEARS = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                         "ff.net.0.proj", "ff.net.2")
_SINGLE_BLOCK_LINEARS = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def condition_lora_targets(num_layers: int, num_single_layers: int) -> list[str]:
    """Every module path of a FLUX transformer the condition LoRA may adapt."""
    paths = ["x_embedder"]
    paths += [f"transformer_blocks.{i}.{m}" for i in range(num_layers) for m in _DOUBLE_BLOCK_LINEARS]
    paths += [f"single_transformer_blocks.{i}.{m}" for i in range(num_single_layers) for m in _SINGLE_BLOCK_LINEARS]
    return paths


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on [B, S, H, D] with (cos, sin) [S, D]: diffusers' ``apply_rotary_emb`` (sequence_dim=1), op for op.

    Written with ``unflatten`` rather than ``reshape(*x.shape[:-1], -1, 2)``: the legacy ONNX tracer
    bakes the latter's shape, batch included, into the graph as a constant.
    """
    cos, sin = rope
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(x.dtype)


# -- LoRA file -------------------------------------------------------------------------------------

_PREFIXES = ("transformer.", "base_model.model.")


def read_condition_lora(path: str | Path, transformer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (down [r, in], up [out, r] x alpha/r)}`` from a diffusers/PEFT LoRA safetensors file.

    Keys look like ``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight`` (what
    ``FluxPipeline.save_lora_weights`` writes, the OminiControl release format). ``alpha`` comes
    from the file's ``lora_adapter_metadata`` or per-module ``.alpha`` entries; without either it
    equals the rank (scale 1), as diffusers assumes.
    """
    from safetensors import safe_open

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    adapter = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    file_alpha = adapter.get("transformer.lora_alpha")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        for part, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
            if name.endswith(part):
                pairs.setdefault(name[: -len(part)], {})[slot] = tensor
                break
        else:
            raise ValueError(f"{path.name}: unexpected key {key!r} in a LoRA file")

    modules = dict(transformer.named_modules())
    targets = set(condition_lora_targets(len(transformer.transformer_blocks),
                                         len(transformer.single_transformer_blocks)))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ignored = []
    for name, pair in sorted(pairs.items()):
        if "down" not in pair or "up" not in pair:
            raise ValueError(f"{path.name}: {name} has only one of lora_A / lora_B")
        if name not in targets:
            ignored.append(name)  # e.g. text-stream layers: condition tokens never pass through them
            continue
        down, up = pair["down"].float(), pair["up"].float()
        linear = modules[name]
        rank = down.shape[0]
        if down.shape != (rank, linear.in_features) or up.shape != (linear.out_features, rank):
            raise ValueError(f"{path.name}: {name} LoRA shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit "
                             f"a {linear.in_features} -> {linear.out_features} linear layer")
        alpha = float(pair["alpha"]) if "alpha" in pair else float(file_alpha or rank)
        out[name] = (down, up * (alpha / rank))
    if ignored:
        logger.warning("%s: %d LoRA module(s) outside the condition branch are ignored: %s", path.name,
                       len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if not out:
        raise ValueError(f"{path.name}: no LoRA weights for the condition branch of this transformer")
    return out


class LoRALinear(nn.Module):
    """The low-rank update ``up(down(x))`` of one linear layer (its scale applied by the caller)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)

    def forward(self, x):
        return self.up(self.down(x))


# -- the condition branch ---------------------------------------------------------------------------

class ConditionBranch(nn.Module):
    """The condition tokens' path through a FLUX transformer: image-stream layers plus the LoRA on them."""

    def __init__(self, transformer: nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | nn.ModuleDict):
        super().__init__()
        self.transformer = transformer
        # ModuleDict keys may not contain dots.
        self.lora = lora if isinstance(lora, nn.ModuleDict) else nn.ModuleDict(
            {name.replace(".", "-"): LoRALinear(*w) for name, w in lora.items()})

    def _linear(self, name: str, linear: nn.Linear, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` plus the LoRA update scaled per batch row, as PEFT computes it."""
        out = linear(x)
        key = name.replace(".", "-")
        if key not in self.lora:
            return out
        return out + self.lora[key](x) * scale.view(scale.shape[0], *([1] * (x.dim() - 1)))

    def _qkv(self, prefix, attn, x, rope, scale):
        q = self._linear(f"{prefix}.attn.to_q", attn.to_q, x, scale).unflatten(-1, (-1, attn.head_dim))
        k = self._linear(f"{prefix}.attn.to_k", attn.to_k, x, scale).unflatten(-1, (-1, attn.head_dim))
        v = self._linear(f"{prefix}.attn.to_v", attn.to_v, x, scale).unflatten(-1, (-1, attn.head_dim))
        return apply_rope(attn.norm_q(q), rope), apply_rope(attn.norm_k(k), rope), v

    @staticmethod
    def _attend(attn, q, k, v, mask=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=attn.processor._attention_backend)
        return out.flatten(2, 3).to(q.dtype)


class ConditionKVModule(ConditionBranch):
    """(condition_latents, condition_ids, pooled_projections, lora_scale) -> (condition_key, condition_value).

    The cached mode's condition pass: the packed condition tokens run through every block of
    ``transformer`` (image-stream weights, LoRA on, timestep 0, self-attention among condition
    tokens only) and it returns each block's keys (RMS-normed, RoPE applied) and values, stacked
    as [B, blocks, Nc, heads, head_dim].
    """

    def forward(self, condition_latents, condition_ids, pooled_projections, lora_scale):
        t = self.transformer
        scale = lora_scale.to(condition_latents.dtype)
        x = self._linear("x_embedder", t.x_embedder, condition_latents, scale)
        # Timestep 0 for every condition token (the image is clean); zeros_like keeps the batch axis dynamic.
        temb = t.time_text_embed(torch.zeros_like(pooled_projections[:, 0]), pooled_projections)
        rope = t.pos_embed(condition_ids[0])
        emb_in = F.silu(temb)
        keys, values = [], []
        last = len(t.transformer_blocks) + len(t.single_transformer_blocks) - 1

        for i, block in enumerate(t.transformer_blocks):
            p = f"transformer_blocks.{i}"
            mod = self._linear(f"{p}.norm1.linear", block.norm1.linear, emb_in, scale)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            h = block.norm1.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            q, k, v = self._qkv(p, block.attn, h, rope, scale)
            keys.append(k)
            values.append(v)
            if i == last:
                break
            a = self._linear(f"{p}.attn.to_out.0", block.attn.to_out[0], self._attend(block.attn, q, k, v), scale)
            x = x + gate_msa.unsqueeze(1) * a
            h = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            gelu = block.ff.net[0]
            h = gelu.gelu(self._linear(f"{p}.ff.net.0.proj", gelu.proj, h, scale))
            h = self._linear(f"{p}.ff.net.2", block.ff.net[2], h, scale)
            x = x + gate_mlp.unsqueeze(1) * h

        for j, block in enumerate(t.single_transformer_blocks):
            p = f"single_transformer_blocks.{j}"
            mod = self._linear(f"{p}.norm.linear", block.norm.linear, emb_in, scale)
            shift, scale_msa, gate = mod.chunk(3, dim=1)
            h = block.norm.norm(x) * (1 + scale_msa[:, None]) + shift[:, None]
            q, k, v = self._qkv(p, block.attn, h, rope, scale)
            keys.append(k)
            values.append(v)
            if len(t.transformer_blocks) + j == last:
                break  # the last block's condition output feeds nothing
            mlp = block.act_mlp(self._linear(f"{p}.proj_mlp", block.proj_mlp, h, scale))
            out = self._linear(f"{p}.proj_out", block.proj_out,
                               torch.cat([self._attend(block.attn, q, k, v), mlp], dim=2), scale)
            x = x + gate.unsqueeze(1) * out

        return torch.stack(keys, dim=1), torch.stack(values, dim=1)


# -- the cached mode: text and image attend to precomputed condition keys ----------------------------

class ConditionedFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor``, whose text and image queries also attend to condition keys/values.

    Without condition tensors it computes exactly what ``FluxAttnProcessor`` computes. ``block`` is
    this attention's index among all blocks (double, then single), i.e. its slice of the stacked
    condition K/V.
    """

    _attention_backend = None
    _parallel_config = None
    reads_fused_projections = True
    """Projects q/k/v through ``_get_qkv_projections``, so ``diffserve.engine.torch_optimize`` may fuse them."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 condition_key=None, condition_value=None, condition_bias=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rope(query, image_rotary_emb)
            key = apply_rope(key, image_rotary_emb)

        if condition_key is not None:
            cond_key = condition_key[:, self.block].to(key.dtype)
            cond_value = condition_value[:, self.block].to(value.dtype)
            # Additive mask over keys [B, 1, 1, S + Nc]: 0 for text/image keys, log(strength) for condition keys.
            bias = condition_bias.to(query.dtype)
            attention_mask = torch.cat([torch.zeros_like(key[:, :, 0, 0]),
                                        torch.zeros_like(cond_key[:, :, 0, 0]) + bias], dim=1)[:, None, None, :]
            key = torch.cat([key, cond_key], dim=1)
            value = torch.cat([value, cond_value], dim=1)

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def install_condition_processors(transformer: nn.Module) -> None:
    """Give every attention of a FluxTransformer2DModel a ``ConditionedFluxAttnProcessor`` with its block index."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for index, block in enumerate(blocks):
        block.attn.set_processor(ConditionedFluxAttnProcessor(index))


class FluxCachedConditionTransformerModule(nn.Module):
    """(hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids
    [, condition_key, condition_value, condition_bias]) -> noise_pred: the cached mode's transformer.

    ``timestep`` is sigma in [0, 1] (the transformer scales it by 1000); ids are [B, N, 3] with
    identical rows, of which row 0 is used.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        install_condition_processors(transformer)
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                condition_key=None, condition_value=None, condition_bias=None):
        kwargs = None
        if condition_key is not None:
            kwargs = {"condition_key": condition_key, "condition_value": condition_value,
                      "condition_bias": condition_bias}
        return self.transformer(
            hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, img_ids=img_ids[0], txt_ids=txt_ids[0],
            joint_attention_kwargs=kwargs, return_dict=False,
        )[0]


# -- the joint mode (the default): one attention over text, image and condition tokens ---------------

def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerModule(ConditionBranch):
    """(hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids
    [, condition_latents, condition_ids, lora_scale, condition_bias]) -> noise_pred.

    Without condition tokens this is diffusers' ``FluxTransformer2DModel`` forward. With them, every
    block runs three streams — text (context weights), image (image-stream weights, timestep t) and
    condition (image-stream weights + LoRA, timestep 0) — whose queries all attend to the keys of
    all three, as the reference's ``transformer_forward`` with its default all-ones group mask. Each
    stream takes its AdaLN modulation from its own timestep embedding (the reference's per-branch
    ``tembs``). ``timestep`` is sigma in [0, 1]; ids are [B, N, 3] with identical rows.
    """

    def __init__(self, transformer: nn.Module,
                 lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | nn.ModuleDict | None = None):
        super().__init__(transformer, lora or {})
        install_condition_processors(transformer)  # plain path: equal to FluxAttnProcessor

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                condition_latents=None, condition_ids=None, lora_scale=None, condition_bias=None):
        t = self.transformer
        if condition_latents is None:
            return t(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=pooled_projections, img_ids=img_ids[0], txt_ids=txt_ids[0],
                     return_dict=False)[0]
        if not len(self.lora):
            raise ValueError("condition tokens given, but this transformer was loaded without a condition LoRA")
        scale = lora_scale.to(hidden_states.dtype)
        bias = condition_bias.to(hidden_states.dtype)
        x = t.x_embedder(hidden_states)
        c = self._linear("x_embedder", t.x_embedder, condition_latents, scale)
        e = t.context_embedder(encoder_hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        temb = t.time_text_embed(timestep, pooled_projections)
        temb_c = t.time_text_embed(torch.zeros_like(timestep), pooled_projections)  # the condition is clean
        emb_c = F.silu(temb_c)
        rope = t.pos_embed(torch.cat([txt_ids[0], img_ids[0]], dim=0))
        rope_c = t.pos_embed(condition_ids[0])
        text_len = e.shape[1]

        for i, block in enumerate(t.transformer_blocks):
            p, attn = f"transformer_blocks.{i}", block.attn
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
            ne, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(e, emb=temb)
            mod = self._linear(f"{p}.norm1.linear", block.norm1.linear, emb_c, scale)
            k_shift_msa, k_scale_msa, k_gate_msa, k_shift_mlp, k_scale_mlp, k_gate_mlp = mod.chunk(6, dim=1)
            nc = block.norm1.norm(c) * (1 + k_scale_msa[:, None]) + k_shift_msa[:, None]

            heads = (-1, attn.head_dim)
            q = torch.cat([attn.norm_added_q(attn.add_q_proj(ne).unflatten(-1, heads)),
                           attn.norm_q(attn.to_q(nx).unflatten(-1, heads))], dim=1)
            k = torch.cat([attn.norm_added_k(attn.add_k_proj(ne).unflatten(-1, heads)),
                           attn.norm_k(attn.to_k(nx).unflatten(-1, heads))], dim=1)
            v = torch.cat([attn.add_v_proj(ne).unflatten(-1, heads), attn.to_v(nx).unflatten(-1, heads)], dim=1)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            qc, kc, vc = self._qkv(p, attn, nc, rope_c, scale)
            out, out_c = self._joint_attention(attn, (q, k, v), (qc, kc, vc), bias)
            out_e, out_x = out[:, :text_len], out[:, text_len:]

            x = x + gate_msa.unsqueeze(1) * attn.to_out[1](attn.to_out[0](out_x))
            x = x + gate_mlp.unsqueeze(1) * block.ff(block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            e = e + c_gate_msa.unsqueeze(1) * attn.to_add_out(out_e)
            e = e + c_gate_mlp.unsqueeze(1) * block.ff_context(
                block.norm2_context(e) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None])
            c = c + k_gate_msa.unsqueeze(1) * self._linear(f"{p}.attn.to_out.0", attn.to_out[0], out_c, scale)
            h = block.norm2(c) * (1 + k_scale_mlp[:, None]) + k_shift_mlp[:, None]
            gelu = block.ff.net[0]
            h = gelu.gelu(self._linear(f"{p}.ff.net.0.proj", gelu.proj, h, scale))
            c = c + k_gate_mlp.unsqueeze(1) * self._linear(f"{p}.ff.net.2", block.ff.net[2], h, scale)
            x, e, c = _clip_fp16(x), _clip_fp16(e), _clip_fp16(c)

        h_main = torch.cat([e, x], dim=1)
        for j, block in enumerate(t.single_transformer_blocks):
            p, attn = f"single_transformer_blocks.{j}", block.attn
            nm, gate = block.norm(h_main, emb=temb)
            mlp = block.act_mlp(block.proj_mlp(nm))
            heads = (-1, attn.head_dim)
            q = apply_rope(attn.norm_q(attn.to_q(nm).unflatten(-1, heads)), rope)
            k = apply_rope(attn.norm_k(attn.to_k(nm).unflatten(-1, heads)), rope)
            v = attn.to_v(nm).unflatten(-1, heads)
            mod = self._linear(f"{p}.norm.linear", block.norm.linear, emb_c, scale)
            k_shift, k_scale, k_gate = mod.chunk(3, dim=1)
            nc = block.norm.norm(c) * (1 + k_scale[:, None]) + k_shift[:, None]
            mlp_c = block.act_mlp(self._linear(f"{p}.proj_mlp", block.proj_mlp, nc, scale))
            qc, kc, vc = self._qkv(p, attn, nc, rope_c, scale)
            out, out_c = self._joint_attention(attn, (q, k, v), (qc, kc, vc), bias)
            h_main = _clip_fp16(h_main + gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], dim=2)))
            c = _clip_fp16(c + k_gate.unsqueeze(1) * self._linear(f"{p}.proj_out", block.proj_out,
                                                                  torch.cat([out_c, mlp_c], dim=2), scale))

        x = t.norm_out(h_main[:, text_len:], temb)
        return t.proj_out(x)

    def _joint_attention(self, attn, main, cond, bias):
        """Text+image queries and condition queries, each over the keys of all three streams.

        Two calls with per-key masks rather than one with a [S, S] mask: the condition bias sits on
        the condition keys for text/image queries and on the text/image keys for condition queries
        (``log(strength)`` both ways, as the older reference's ``condition_scale``).
        """
        (q, k, v), (qc, kc, vc) = main, cond
        key, value = torch.cat([k, kc], dim=1), torch.cat([v, vc], dim=1)
        zeros, zeros_c = torch.zeros_like(k[:, :, 0, 0]), torch.zeros_like(kc[:, :, 0, 0])
        mask = torch.cat([zeros, zeros_c + bias], dim=1)[:, None, None, :]
        mask_c = torch.cat([zeros + bias, zeros_c], dim=1)[:, None, None, :]
        return self._attend(attn, q, key, value, mask), self._attend(attn, qc, key, value, mask_c)
