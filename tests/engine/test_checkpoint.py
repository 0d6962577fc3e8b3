"""A checkpoint directory's layout reads into the facts the pipelines need (diffserve.engine.checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest

from diffserve.engine.checkpoint import (
    CONDITION_LORA_DIR, FLUX_MAX_SEQUENCE_LENGTH, find_condition_lora, load_tokenizer, read_architecture,
    tokenizer_dir,
)


def test_sd15_checkpoint_reads_as_the_sd15_family(sd15_dir):
    cfg = read_architecture(sd15_dir)
    vae = json.loads((sd15_dir / "vae" / "config.json").read_text())
    unet = json.loads((sd15_dir / "unet" / "config.json").read_text())
    assert cfg.family == "sd15" and cfg.num_text_encoders == 1
    assert cfg.vae_scale_factor == 2 ** (len(vae["block_out_channels"]) - 1)
    assert cfg.unet_cross_attention_dim == unet["cross_attention_dim"]
    assert cfg.sample_size == unet["sample_size"]
    assert cfg.tokenizer_max_length == 77
    assert cfg.addition_time_embed_dim is None and cfg.text_encoder_projection_dim is None
    assert cfg.transformer is None and cfg.omni_zero is None
    assert cfg.scheduler_config["_class_name"] == "PNDMScheduler"


def test_sdxl_checkpoint_reads_both_encoders_and_its_micro_conditioning(sdxl_dir):
    cfg = read_architecture(sdxl_dir)
    assert cfg.family == "sdxl" and cfg.num_text_encoders == 2 and len(cfg.text_hidden_sizes) == 2
    assert cfg.addition_time_embed_dim is not None and cfg.text_encoder_projection_dim is not None
    assert cfg.force_zeros_for_empty_prompt  # SDXL's default where model_index.json says nothing else
    assert cfg.omni_zero is None  # a plain SDXL directory has none of Omni-Zero's parts


def test_omni_zero_checkpoint_is_sdxl_with_its_additions(tiny_checkpoints):
    cfg = read_architecture(tiny_checkpoints["omni-zero"])
    assert cfg.family == "sdxl" and cfg.omni_zero is not None


def test_flux_checkpoint_reads_its_transformer_and_sequence_length(tiny_checkpoints):
    root = tiny_checkpoints["ominicontrol"]
    cfg = read_architecture(root)
    t = json.loads((root / "transformer" / "config.json").read_text())
    assert cfg.family == "flux" and cfg.transformer is not None
    assert cfg.transformer.in_channels == 4 * cfg.latent_channels
    assert cfg.transformer.num_blocks == t["num_layers"] + t["num_single_layers"]
    assert cfg.sample_size * cfg.vae_scale_factor == 1024
    assert 0 < cfg.max_sequence_length <= FLUX_MAX_SEQUENCE_LENGTH
    assert find_condition_lora(root).parent == root / CONDITION_LORA_DIR


def test_not_a_checkpoint_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        read_architecture(tmp_path)


def test_flux_transformer_width_must_pack_the_vae_latents(tiny_checkpoints, tmp_path):
    root = tmp_path / "flux"
    shutil.copytree(tiny_checkpoints["ominicontrol"], root, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((root / "transformer" / "config.json").read_text())
    config["in_channels"] += 4
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="2x2 packing"):
        read_architecture(root)


def test_an_infinite_tokenizer_length_falls_back_to_clip_s_77(sd15_dir, tmp_path):
    root = tmp_path / "sd15"
    shutil.copytree(sd15_dir, root, ignore=shutil.ignore_patterns("*.safetensors"))
    path = tokenizer_dir(root, 0) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = int(1e30)
    path.write_text(json.dumps(config))
    assert read_architecture(root).tokenizer_max_length == 77


def test_condition_lora_is_the_one_safetensors_file_or_none(tmp_path):
    assert find_condition_lora(tmp_path) is None
    (tmp_path / CONDITION_LORA_DIR).mkdir()
    (tmp_path / CONDITION_LORA_DIR / "a.safetensors").write_bytes(b"")
    assert find_condition_lora(tmp_path) == tmp_path / CONDITION_LORA_DIR / "a.safetensors"
    (tmp_path / CONDITION_LORA_DIR / "b.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="exactly one"):
        find_condition_lora(tmp_path)


def test_tokenizers_are_clip_except_flux_s_second_one(sdxl_dir, tiny_checkpoints):
    from transformers import CLIPTokenizer, T5TokenizerFast

    assert tokenizer_dir(sdxl_dir, 1) == sdxl_dir / "tokenizer_2"
    assert isinstance(load_tokenizer(sdxl_dir, "sdxl", 1), CLIPTokenizer)
    assert isinstance(load_tokenizer(tiny_checkpoints["ominicontrol"], "flux", 0), CLIPTokenizer)
    assert isinstance(load_tokenizer(tiny_checkpoints["ominicontrol"], "flux", 1), T5TokenizerFast)
