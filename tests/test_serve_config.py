"""serve/config.yaml is a valid Serve deploy config (Ray's own schema) whose app args are ServeConfig keys, and
the request checks of the endpoint, without a server."""

import base64
from pathlib import Path

import pytest
import yaml

from detailfusion.library.config import ServeConfig, from_dict
from detailfusion.platform.serving.queries import Limits, RequestError, parse_json

REPO = Path(__file__).resolve().parents[1]


def test_serve_config_yaml_validates_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "detailfusion.platform.serving.app:app_builder"
    config = from_dict(ServeConfig, app.args, source="serve/config.yaml")
    assert config.min_replicas <= config.max_replicas


@pytest.mark.parametrize("body, status, code", [
    (b"[1, 2]", 400, "bad_json"),
    (b'{"text": "x", "top_k": true, "reference_id": "a"}', 422, "bad_top_k"),
    (b'{"text": "x", "top_k": "3", "reference_id": "a", "image": "aGk="}', 422, "ambiguous_reference"),
])
def test_json_requests_are_checked(body, status, code):
    with pytest.raises(RequestError) as error:
        parse_json(body, size=64, gallery_size=10, limits=Limits())
    assert (error.value.status, error.value.code) == (status, code)


def test_a_data_url_image_is_accepted(tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    query = parse_json(f'{{"image": "{url}", "text": " make it blue ", "top_k": "3"}}'.encode(), 64, 10, Limits())
    assert query.pixels.shape == (64, 64, 3) and query.text == "make it blue" and query.top_k == 3


def test_an_index_of_another_model_is_refused_before_serving(tmp_path, tiny):
    import torch

    from detailfusion.library.index.exact import GalleryIndex, IndexMismatch
    from detailfusion.library.model import save_model
    from detailfusion.platform.serving.app import build_app

    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "model")
    GalleryIndex(torch.zeros(2, 8, 64), ["a", "b"], model_fingerprint="another-model").save(tmp_path / "index")
    with pytest.raises(IndexMismatch, match="rebuild it with `detailfusion index`"):
        build_app(ServeConfig(checkpoint=str(tmp_path / "model"), index=str(tmp_path / "index")))
    with pytest.raises(FileNotFoundError, match="nowhere: no index.json; not a complete gallery index"):
        build_app(ServeConfig(checkpoint=str(tmp_path / "model"), index=str(tmp_path / "nowhere")))


def test_the_api_token_comes_from_the_environment_or_a_file_not_both(tmp_path, monkeypatch):
    from detailfusion.library.config import ConfigError
    from detailfusion.platform.serving.auth import TOKEN_VARIABLE, load_token

    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    assert load_token(None) is None  # no token: an open endpoint
    monkeypatch.setenv(TOKEN_VARIABLE, "from-env")
    assert load_token(None) == "from-env"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    with pytest.raises(ConfigError, match="set twice"):
        load_token(str(token))
    monkeypatch.delenv(TOKEN_VARIABLE)
    assert load_token(str(token)) == "from-file"
    token.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_token(str(token))
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(str(tmp_path / "absent"))


def test_a_request_is_authorized_by_its_bearer_token_only():
    from detailfusion.platform.serving.auth import authorized, token_digest

    digest = token_digest("s3cret")
    assert authorized("Bearer s3cret", digest) and authorized("bearer s3cret", digest)
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not authorized(header, digest), header
    assert authorized(None, None)  # no token configured: open
