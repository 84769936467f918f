"""Publishing the request bodies' schemas in ``/openapi.json``.

The completion routes read their body themselves (to bound its size while it
streams in, to parse it off the event loop, and to answer malformed input with
OpenAI's error shape rather than FastAPI's), so FastAPI cannot see a body model
to document. Without one a schema-driven fuzzer (schemathesis) sends empty
bodies and never reaches the validation, the template or the engine.
``request_body_schema`` declares the body in the route's ``openapi_extra``;
``openapi_with_request_bodies`` adds the pydantic models' JSON schemas (and the
models they nest) to ``components.schemas``, where those references point.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from splitserve import openai_protocol as oai

BODY_MODELS: tuple[type[BaseModel], ...] = (oai.CompletionRequest, oai.ChatCompletionRequest)
_REF = "#/components/schemas/{model}"


def request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_with_request_bodies(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the body models in its components (built once, then cached by FastAPI's rule)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in BODY_MODELS:
        schema = model.model_json_schema(ref_template=_REF, mode="validation")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    app.openapi_schema = doc
    return doc
