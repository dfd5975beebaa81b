"""The ``/llm/{id}/`` generation routes (issue 18) in the proxy's published OpenAPI schema, as the plain ones are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmpod.backends import Backend
from llmpod.proxy.app import create_app
from llmpod.proxy.routing import split_model_path
from llmpod.proxy.settings import ProxySettings

MODEL_PATHS = {
    "/llm/{model_id}/v1/chat/completions": "/v1/chat/completions",
    "/llm/{model_id}/chat/completions": "/v1/chat/completions",
    "/llm/{model_id}/v1/completions": "/v1/completions",
    "/llm/{model_id}/completions": "/v1/completions",
}


def schema_of(tmp_path: Path, *backends: Backend) -> dict[str, Any]:
    settings = ProxySettings(cache_dir=tmp_path / "cache", log_file=None, backends=backends)
    return create_app(settings).openapi()  # what GET /openapi.json serves


def test_llm_routes_are_in_the_schema_with_their_model_id(tmp_path: Path) -> None:
    chat = Backend(id="chat", base_url="http://127.0.0.1:9/v1")
    paths = schema_of(tmp_path, chat)["paths"]
    operation_ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))  # unique, as OpenAPI requires
    for path, plain in MODEL_PATHS.items():
        assert set(paths.get(path, {})) == {"post"}, path
        post, plain_post = paths[path]["post"], paths[plain]["post"]
        assert post["requestBody"] == plain_post["requestBody"]  # the same body as the plain route
        assert post["parameters"] == [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string", "title": "Model Id"}}
        ]
        # every documented path is one the proxy routes, to the generation route it claims to be
        assert split_model_path(path.replace("{model_id}", "chat")) == ("chat", plain)


def test_a_single_model_proxy_documents_no_llm_generation_routes(tmp_path: Path) -> None:
    paths = schema_of(tmp_path)["paths"]
    assert not [path for path in paths if path.startswith("/llm/") and "post" in paths[path]]
    assert {"/v1/chat/completions", "/v1/completions"} <= set(paths)
