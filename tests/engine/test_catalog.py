"""The catalog states every seed-page parameter exactly, and validation names every violation."""

from __future__ import annotations

import pytest

from diffserve.engine.catalog import CATALOG, ParamType, UnknownModelError, ValidationError, get_model, validate
from diffserve.engine.schedulers import SCHEDULER_NAMES

# (slug, param): (required, default, minimum, maximum, choices) as the seed pages state them.
SEED_FACTS = {
    ("sd1.5-scifi", "prompt"): (True, None, None, None, None),
    ("sd1.5-scifi", "base64"): (False, False, None, None, None),
    ("sd1.5-scifi", "guidance_scale"): (False, 7.5, 0.1, 25, None),
    ("sd1.5-scifi", "img_height"): (False, 512, None, None, (512, 768, 1024)),
    ("sd1.5-scifi", "img_width"): (False, 512, None, None, (512, 768, 1024)),
    ("sd1.5-scifi", "num_inference_steps"): (False, 20, 20, 100, None),
    ("sd1.5-scifi", "samples"): (False, 1, 1, 4, None),
    ("sd1.5-scifi", "scheduler"): (False, "UniPC", None, None, SCHEDULER_NAMES),
    ("sd1.5-scifi", "seed"): (False, -1, -1, None, None),
    ("sd1.5-img2img", "image"): (True, None, None, None, None),
    ("sd1.5-img2img", "prompt"): (True, None, None, None, None),
    ("sd1.5-img2img", "img_width"): (False, 512, None, None, (512, 768)),
    ("sd1.5-img2img", "img_height"): (False, 512, None, None, (512, 768)),
    ("sd1.5-img2img", "strength"): (False, 1, 0.1, 1, None),
    ("sd1.5-img2img", "scheduler"): (False, "DDIM", None, None, SCHEDULER_NAMES),
    ("sd1.5-img2img", "guidance_scale"): (False, 7.5, 0.1, 25, None),
    ("sd1.5-img2img", "num_inference_steps"): (False, 20, 20, 100, None),
    ("segmind-vega", "img_width"): (False, 1024, None, None, (1024,)),
    ("segmind-vega", "img_height"): (False, 1024, None, None, (1024,)),
    ("segmind-vega", "guidance_scale"): (False, 7.5, 1, 25, None),
    ("segmind-vega", "num_inference_steps"): (False, 25, 20, 100, None),
    ("segmind-vega", "scheduler"): (False, "DPM2 Karras", None, None, SCHEDULER_NAMES),
    ("segmind-vega", "seed"): (False, -1, -1, 999_999_999_999_999, None),
    ("omni-zero", "identity_image"): (True, None, None, None, None),
    ("omni-zero", "style_image"): (True, None, None, None, None),
    ("omni-zero", "base_image_strength"): (False, 0.15, 0, 1, None),
    ("omni-zero", "composition_image_strength"): (False, 1, 0, 1, None),
    ("omni-zero", "depth_image"): (False, None, None, None, None),
    ("omni-zero", "depth_image_strength"): (False, 0.5, 0, 1, None),
    ("omni-zero", "guidance_scale"): (False, 3, 0, 14, None),
    ("omni-zero", "identity_image_strength"): (False, 1, 0, 1, None),
    ("omni-zero", "negative_prompt"): (False, "blurry, out of focus", None, None, None),
    ("omni-zero", "number_of_images"): (False, 1, 1, 4, None),
    ("omni-zero", "number_of_steps"): (False, 10, 1, 50, None),
    ("omni-zero", "prompt"): (False, "A person", None, None, None),
    ("omni-zero", "seed"): (False, 42, -1, None, None),
    ("omni-zero", "style_image_strength"): (False, 1, 0, 1, None),
    ("ominicontrol", "image"): (True, None, None, None, None),
    ("ominicontrol", "prompt"): (True, None, None, None, None),
    ("ominicontrol", "steps"): (False, 8, 4, 40, None),
    ("ominicontrol", "seed"): (False, 12467, -1, None, None),
    ("ominicontrol", "image_format"): (False, "png", None, None, ("png", "jpeg", "webp")),
    ("ominicontrol", "image_quality"): (False, 95, 10, 100, None),
    ("ominicontrol", "base64"): (False, True, None, None, None),
}

PARAM_SETS = {
    "sd1.5-scifi": {"prompt", "base64", "guidance_scale", "img_height", "img_width", "negative_prompt",
                    "num_inference_steps", "samples", "scheduler", "seed"},
    "sd1.5-img2img": {"image", "prompt", "base64", "guidance_scale", "img_height", "img_width", "negative_prompt",
                      "num_inference_steps", "samples", "scheduler", "seed", "strength"},
    "segmind-vega": {"prompt", "base64", "guidance_scale", "img_height", "img_width", "negative_prompt",
                     "num_inference_steps", "samples", "scheduler", "seed"},
    "omni-zero": {"identity_image", "style_image", "base_image", "base_image_strength", "composition_image",
                  "composition_image_strength", "depth_image", "depth_image_strength", "guidance_scale",
                  "identity_image_strength", "negative_prompt", "number_of_images", "number_of_steps", "prompt",
                  "seed", "style_image_strength"},
    "ominicontrol": {"image", "prompt", "steps", "seed", "image_format", "image_quality", "base64"},
}


def test_every_slug_has_exactly_the_seed_parameters():
    assert set(CATALOG) == set(PARAM_SETS)
    for slug, names in PARAM_SETS.items():
        assert set(get_model(slug).param_names) == names, slug


@pytest.mark.parametrize(("slug", "name"), sorted(SEED_FACTS))
def test_parameter_matches_seed_page(slug, name):
    required, default, minimum, maximum, choices = SEED_FACTS[(slug, name)]
    p = get_model(slug).param(name)
    assert p.required == required
    assert p.default == default
    assert p.minimum == minimum
    if maximum is not None:
        assert p.maximum == maximum
    assert (tuple(p.choices) if p.choices else None) == choices


def minimal_payload(slug: str) -> dict:
    spec = get_model(slug)
    return {p.name: ("https://example.com/x.png" if p.type is ParamType.IMAGE else "a prompt")
            for p in spec.params if p.required}


@pytest.mark.parametrize("slug", sorted(CATALOG))
def test_defaults_fill_a_minimal_request(slug):
    params = validate(slug, minimal_payload(slug))
    spec = get_model(slug)
    assert set(params) == set(spec.param_names)
    for p in spec.params:
        if not p.required:
            assert params[p.name] == p.default


def _bad_values(p):
    """Wrongly typed and out-of-range values for one parameter."""
    wrong_type = {
        ParamType.STRING: [5, ["a"], {"a": 1}],
        ParamType.IMAGE: [5, "", ["x"]],
        ParamType.INTEGER: ["abc", [1], 1.5, "2.5", True],
        ParamType.NUMBER: ["abc", [1.0], {"x": 1}, True, float("nan")],
        ParamType.BOOLEAN: ["maybe", 2, [True]],
    }[p.type]
    out_of_range = []
    if p.minimum is not None:
        out_of_range.append(p.minimum - (1 if p.type is ParamType.INTEGER else 0.01))
    if p.maximum is not None:
        out_of_range.append(p.maximum + (1 if p.type is ParamType.INTEGER else 0.01))
    if p.choices is not None:
        out_of_range.append(999 if p.type is ParamType.INTEGER else "not-a-choice")
    return wrong_type + out_of_range


CASES = [(slug, p.name, bad) for slug, spec in sorted(CATALOG.items()) for p in spec.params for bad in _bad_values(p)]


@pytest.mark.parametrize(("slug", "name", "bad"), CASES, ids=[f"{s}-{n}-{b!r}" for s, n, b in CASES])
def test_bad_value_is_rejected_naming_the_parameter(slug, name, bad):
    payload = minimal_payload(slug) | {name: bad}
    with pytest.raises(ValidationError) as info:
        validate(slug, payload)
    assert len(info.value.errors) == 1
    assert f"'{name}'" in info.value.errors[0]


def test_every_violation_is_reported_at_once():
    with pytest.raises(ValidationError) as info:
        validate("sd1.5-scifi", {"img_width": 513, "samples": 9, "scheduler": "nope", "bogus": 1})
    errors = info.value.errors
    assert len(errors) == 5  # unknown field, missing prompt, width, samples, scheduler
    joined = "\n".join(errors)
    for word in ("bogus", "'prompt' is required", "img_width", "samples", "nope"):
        assert word in joined
    assert "UniPC" in joined  # the scheduler error lists the valid names


def test_numbers_sent_as_strings_are_coerced():
    params = validate("sd1.5-scifi", {"prompt": "p", "samples": "2", "guidance_scale": "5", "seed": "42",
                                      "base64": "true", "img_width": "768"})
    assert params["samples"] == 2 and params["guidance_scale"] == 5.0 and params["seed"] == 42
    assert params["base64"] is True and params["img_width"] == 768


def test_scheduler_aliases_are_canonicalised():
    assert validate("sd1.5-scifi", {"prompt": "p", "scheduler": "euler_a"})["scheduler"] == "Euler a"
    assert validate("sd1.5-scifi", {"prompt": "p", "scheduler": "ddim"})["scheduler"] == "DDIM"


def test_unknown_slug():
    with pytest.raises(UnknownModelError) as info:
        get_model("sd2")
    assert "sd1.5-scifi" in str(info.value)


def test_body_must_be_an_object():
    with pytest.raises(ValidationError):
        validate("sd1.5-scifi", ["prompt"])


def test_export_profiles_read_resolutions_from_catalog():
    assert set(get_model("sd1.5-scifi").resolutions()) == {(w, h) for w in (512, 768, 1024) for h in (512, 768, 1024)}
    assert get_model("segmind-vega").resolutions() == [(1024, 1024)]
    assert get_model("sd1.5-scifi").max_batch() == 4
    assert get_model("ominicontrol").max_batch() == 1
