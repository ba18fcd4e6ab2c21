"""The OpenAPI 3.1 document, generated from the route table and the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.http.routing import JSON_CONTENT_TYPE, JSONL_CONTENT_TYPE, Route
from server.http.metrics import PROMETHEUS_CONTENT_TYPE
from server.schemas.common import ErrorResponse, HealthResponse
from server.schemas.openai import ModelList

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
SSE_CONTENT_TYPE = "text/event-stream"
# What each route may refuse with, beside the 200.
ERROR_STATUSES = {
    "400": "Invalid request: the message names the field and the reason.",
    "401": "Missing or wrong API key.",
    "404": "Unknown model, memory bank, document, dataset, job or agent.",
    "413": "Request body too large.",
    "503": "Server at capacity; retry after the Retry-After header's seconds.",
}
# Statuses only some routes answer (Route.errors).
ROUTE_ERROR_STATUSES = {
    409: "Already exists: the message names the uuid.",
    415: "Unsupported media type: the message names the document.",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON_CONTENT_TYPE: {"schema": schema}}


def _error_responses(extra: tuple[int, ...] = ()) -> dict[str, Any]:
    statuses = {**ERROR_STATUSES, **{str(status): ROUTE_ERROR_STATUSES[status] for status in extra}}
    return {status: {"description": text, "content": _json_content(_ref(ErrorResponse))}
            for status, text in sorted(statuses.items())}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One OpenAPI query parameter per field of the route's query model."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    return [{"in": "query", "name": name, "required": name in schema.get("required", []),
             "schema": {k: v for k, v in field.items() if k != "title"},
             **({"description": field["description"]} if "description" in field else {})}
            for name, field in schema["properties"].items()]


def _event_schema(route: Route) -> dict[str, Any]:
    """One server-sent event: its `data` is a JSON chunk (or an error reported after the
    stream began), or the literal end marker where the route sends one."""
    json_data = {"type": "string", "contentMediaType": JSON_CONTENT_TYPE,
                 "contentSchema": {"anyOf": [_ref(route.stream_model), _ref(ErrorResponse)]}}
    data = json_data
    if route.done_marker is not None:
        marker = route.done_marker.decode().removeprefix("data: ").strip()
        data = {"anyOf": [{"const": marker}, json_data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _operation(route: Route) -> dict[str, Any]:
    media = JSONL_CONTENT_TYPE if route.jsonl else JSON_CONTENT_TYPE
    if route.event_stream:
        content: dict[str, Any] = {SSE_CONTENT_TYPE: {"schema": _event_schema(route)}}
        description = f"An event stream of {route.stream_model.__name__}."
    elif route.empty_body:
        content = {}
        description = "Done (an empty body)."
    elif route.response_model is None:
        content = _json_content({"type": "null"})
        description = "Done (JSON null)."
    else:
        content = {media: {"schema": _ref(route.response_model)}}
        description = ("One JSON response per line, in request order." if route.jsonl
                       else "The response.")
    if route.stream_model is not None and not route.event_stream:
        content[SSE_CONTENT_TYPE] = {"schema": _event_schema(route)}
        description += f" With stream=true, an event stream of {route.stream_model.__name__}."
    operation: dict[str, Any] = {
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": route.path.strip("/").replace("/", "_"),
        "responses": {"200": {"description": description, **({"content": content} if content else {})},
                      **_error_responses(route.errors)},
    }
    if route.query_model is not None:
        operation["parameters"] = _query_parameters(route.query_model)
    if route.request_model is not None:
        operation["requestBody"] = {"required": True, "content": _json_content(_ref(route.request_model))}
    return operation


def _get_operation(summary: str, tag: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "tags": [tag],
            "responses": {"200": {"description": summary, "content": content},
                          "401": _error_responses()["401"]}}


def _component_schemas(routes: list[Route]) -> dict[str, Any]:
    entries: list[tuple[type[BaseModel], str]] = [(r.request_model, "validation") for r in routes
                                                  if r.request_model is not None]
    responses = ({r.response_model for r in routes if r.response_model}
                 | {r.stream_model for r in routes if r.stream_model})
    responses |= {ErrorResponse, HealthResponse, ModelList}
    entries += [(m, "serialization") for m in sorted(responses, key=lambda m: m.__name__)]
    _, schemas = models_json_schema(entries, ref_template=REF_TEMPLATE)
    return schemas.get("$defs", {})


def _restrict_model_names(schemas: dict[str, Any], model_names: list[str]) -> None:
    """Requests name a model this server has loaded: say which, so clients (and fuzzers)
    know the valid values."""
    for schema in schemas.values():
        model_field = schema.get("properties", {}).get("model")
        if (model_field is not None and schema.get("title", "").endswith("Request")
                and "enum" not in model_field):  # a route that names its own models keeps them
            # An optional model (null: the server's default) lists the names on its string branch.
            strings = [b for b in model_field.get("anyOf", []) if b.get("type") == "string"]
            (strings[0] if strings else model_field)["enum"] = model_names


def build_openapi(routes: list[Route], model_names: list[str], requires_auth: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    paths["/v1/models"] = {"get": _get_operation("List the loaded models.", "OpenAI",
                                                 _json_content(_ref(ModelList)))}
    paths["/health"] = {"get": {"summary": "Liveness.", "tags": ["Operations"],
                                "responses": {"200": {"description": "Serving.",
                                                      "content": _json_content(_ref(HealthResponse))}}}}
    paths["/metrics"] = {"get": _get_operation("Prometheus metrics.", "Operations",
                                               {PROMETHEUS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}})}
    schemas = _component_schemas(routes)
    _restrict_model_names(schemas, model_names)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "llama-engine", "version": "0.1.0",
                 "description": "The llama-stack Inference, Datasets and PostTraining APIs "
                                "and an OpenAI-compatible API."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if requires_auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        paths["/health"]["get"]["security"] = []
    return document
