"""``serve --models``: incomplete slugs are not served, /readyz says why, the others are served (local backend)."""

from __future__ import annotations

import argparse

from fastapi.testclient import TestClient


def test_serve_skips_incomplete_slug_and_readyz_names_it(tmp_path, tiny_checkpoints, diffserve_home):
    from api.app import create_app
    from api.backend_local import create_local_backend
    from api.cli import _apply_models_file
    from api.settings import Settings

    demo = diffserve_home / "checkpoints" / "published"
    models = tmp_path / "models.toml"
    models.write_text(f'["sd1.5-scifi"]\ncheckpoint = "{demo}/sd/missing.safetensors"\n'
                      f'["sd1.5-img2img"]\ncheckpoint = "{demo}/sd/stable-diffusion-v1-5"\n')
    settings = Settings(data_dir=tmp_path / "api", models_file=models)
    settings, unavailable = _apply_models_file(argparse.Namespace(backend="local"), settings)
    assert list(settings.checkpoints) == ["sd1.5-img2img"] and list(unavailable) == ["sd1.5-scifi"]
    backend = create_local_backend(settings, demo=False)
    backend.unavailable = unavailable
    with TestClient(create_app(settings, backend)) as client:
        body = client.get("/readyz").json()
        assert body["models"] == ["sd1.5-img2img"]
        assert "missing" in body["unavailable"]["sd1.5-scifi"][0]
        assert client.post("/v1/sd1.5-scifi", json={"prompt": "x"}).status_code == 404
