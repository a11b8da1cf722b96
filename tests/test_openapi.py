"""``GET /openapi.json``: an OpenAPI 3 document of every route, built from the schemas and the app."""
from __future__ import annotations

import re

import pytest
import schemathesis
from flask import Response

from morag_remote import create_app
from morag_remote.api.docs import ASSET_RULE
from morag_remote.api.http import Hidden, operation_of
from morag_remote.auth import ANY
from morag_remote.openapi import undocumented_endpoints

IGNORED = {"HEAD", "OPTIONS"}


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json


def _resolve(document: dict, obj: dict) -> dict:
    while "$ref" in obj:
        kind, name = obj["$ref"].split("/")[-2:]
        obj = document["components"][kind][name]
    return obj


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def _hidden(app, rule) -> bool:
    return isinstance(operation_of(app.view_functions[rule.endpoint]), Hidden)


def test_every_endpoint_is_documented_by_its_view(app):
    missing = undocumented_endpoints(app)
    assert not missing, ("views without @documented (or @hidden, for a route that is no API operation); "
                         f"describe each next to its @requires so /openapi.json documents it: {', '.join(missing)}")


def test_every_route_flask_knows_is_in_the_document(app, document):
    """Each route but the hidden ones, at its path or, for a trailing-slash variant, at the path without."""
    for rule in app.url_map.iter_rules():
        if _hidden(app, rule):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule.rule)
        for method in rule.methods - IGNORED:
            item = document["paths"].get(path) or document["paths"].get(path.rstrip("/"), {})
            assert method.lower() in item, f"{method} {rule.rule} is not documented"


def test_no_path_is_documented_with_and_without_a_trailing_slash(app, document):
    paths = set(document["paths"])
    assert not {p for p in paths if p != "/" and p.endswith("/") and p.rstrip("/") in paths}
    assert {("GET", "/api/v1/remote-jobs/"), ("POST", "/api/v1/remote-jobs/")} <= {
        (method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods}  # still served


def test_the_slash_variant_is_named_in_its_operation(document):
    for method in ("get", "post"):
        operation = document["paths"]["/api/v1/remote-jobs"][method]
        assert "Also served at `/api/v1/remote-jobs/`." in operation["description"]


def test_the_docs_page_assets_are_not_api_operations(app, document):
    hidden = sorted(rule.rule for rule in app.url_map.iter_rules()
                    if _hidden(app, rule) and not rule.rule.startswith("/ui/"))
    # and tus's discovery (OPTIONS, in tus headers): served, but no operation of the JSON API
    assert hidden == sorted([ASSET_RULE, "/docs/swagger-initializer.js", "/api/v1/remote-jobs/uploads",
                             "/api/v1/remote-jobs/uploads/"])
    assert not [p for p in document["paths"] if p.startswith("/docs/")]
    assert "/docs" in document["paths"]


def test_a_route_added_without_documentation_is_named_and_still_listed(instance_path):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    app.add_url_rule("/api/v1/extra/<item_id>", "extra.show", lambda item_id: Response(status=204))
    assert undocumented_endpoints(app) == ["extra.show"]
    operation = app.test_client().get("/openapi.json").json["paths"]["/api/v1/extra/{item_id}"]["get"]
    assert operation["tags"] == ["undocumented"]


def test_document_is_valid_openapi_3(document):
    assert document["openapi"].startswith("3.")
    schemathesis.openapi.from_dict(document).validate()


def test_bearer_scheme_is_declared(document):
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"]}


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs"])
def test_health_document_and_docs_are_public(document, path):
    assert document["paths"][path]["get"]["security"] == []


def test_metrics_needs_a_key_unless_configured_public(instance_path):
    for public, security in ((False, [{"bearerAuth": []}]), (True, [])):
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                          "METRICS_PUBLIC": public})
        assert app.test_client().get("/openapi.json").json["paths"]["/metrics"]["get"]["security"] == security


def test_metrics_declares_its_roles_on_the_view_like_every_other(app):
    view = app.view_functions["metrics.metrics"]
    assert view.required_roles == ANY
    assert view.public_if({"METRICS_PUBLIC": "yes"}) and not view.public_if({"METRICS_PUBLIC": "no"})


def test_every_other_operation_needs_a_key_with_the_roles_of_its_view(app, document):
    by_path = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule.rule)
        for method in rule.methods - IGNORED:
            by_path[(path, method.lower())] = getattr(app.view_functions[rule.endpoint], "required_roles", None)
    for path, method, operation in _operations(document):
        roles = by_path[(path, method)]
        if roles is None:
            continue
        assert operation["security"] == [{"bearerAuth": []}], f"{method} {path}"
        assert operation["x-required-roles"] == list(roles)
        assert _resolve(document, operation["responses"]["401"])["headers"]["WWW-Authenticate"]["required"]


def test_paths_use_openapi_templates(document):
    assert all("<" not in path for path in document["paths"])
    (param,) = [p for p in document["paths"]["/api/v1/remote-jobs/{job_id}/status"]["get"]["parameters"]
                if p.get("in") == "path"]
    assert param["name"] == "job_id" and param["required"] is True


def test_job_id_of_get_excludes_the_literal_routes_that_shadow_it(document):
    (param,) = [p for p in document["paths"]["/api/v1/remote-jobs/{job_id}"]["get"]["parameters"]
                if p.get("in") == "path"]
    assert param["schema"]["not"] == {"enum": ["poll", "stats", "workers"]}


def test_the_dashboard_is_no_part_of_the_api(app, document):
    """Every /ui route is @hidden: the dashboard's pages are not operations of the API."""
    ui_rules = [rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/ui/")]
    assert ui_rules and all(_hidden(app, rule) for rule in ui_rules)
    assert not [p for p in document["paths"] if p.startswith("/ui")]


def test_every_error_is_problem_json(document):
    for path, method, operation in _operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            content = _resolve(document, response)["content"]
            assert list(content) == ["application/problem+json"], f"{method} {path} {status}"
            assert _resolve(document, content["application/problem+json"]["schema"])["required"] == \
                ["detail", "status", "title", "type"]


def test_every_response_documents_the_request_id_header(document):
    for path, method, operation in _operations(document):
        for status, response in operation["responses"].items():
            assert "X-Request-ID" in _resolve(document, response)["headers"], f"{method} {path} {status}"


def test_body_and_path_errors_are_declared(document):
    result = document["paths"]["/api/v1/remote-jobs/{job_id}/result"]["put"]["responses"]
    assert {"400", "401", "403", "404", "409", "413", "422"} <= set(result)
    status = document["paths"]["/api/v1/remote-jobs/{job_id}/status"]["get"]["responses"]
    assert set(status) == {"200", "401", "404", "500", "503"}  # any key may read a status: no 403


def test_delete_answers_204_without_a_body(document):
    responses = document["paths"]["/api/v1/remote-jobs/{job_id}"]["delete"]["responses"]
    assert "content" not in responses["204"]
    assert "200" not in responses


def test_download_is_an_octet_stream_with_ranges(document):
    operation = document["paths"]["/api/v1/remote-jobs/{job_id}/download"]["get"]
    responses = operation["responses"]
    assert responses["200"]["content"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert "Content-Range" in responses["206"]["headers"]
    assert _resolve(document, responses["416"])["headers"]["Content-Range"]["required"]
    names = {_resolve(document, p)["name"] for p in operation["parameters"]}
    assert {"token", "Range", "X-Lease-Id"} <= names


def test_success_bodies_are_exact(document):
    detail = document["components"]["schemas"]["JobDetail"]
    assert detail["additionalProperties"] is False
    assert detail["required"] == sorted(detail["properties"])
    assert "result_data" in detail["properties"]
    summary = document["components"]["schemas"]["JobSummary"]
    assert "result_data" not in summary["properties"]


def test_request_bodies_reject_unknown_fields_except_the_result(document):
    schemas = document["components"]["schemas"]
    assert schemas["CreateJobRequest"]["additionalProperties"] is False
    assert "additionalProperties" not in schemas["SubmitResultRequest"]  # EXCLUDE: seed workers send extras


def test_problem_admits_extension_members(document):
    assert document["components"]["schemas"]["Problem"]["additionalProperties"] is True


@pytest.mark.parametrize("app_config", [{"POLL_MAX_JOBS": 7, "POLL_MAX_WAIT_SECONDS": 5,
                                         "CONTENT_TYPES": ["audio", "pdf"]}])
def test_bounds_and_choices_follow_the_settings(document):
    query = {p["name"]: p for p in document["paths"]["/api/v1/remote-jobs/poll"]["get"]["parameters"] if "name" in p}
    assert query["max_jobs"]["schema"]["maximum"] == 7
    assert query["wait"]["schema"]["maximum"] == 5
    assert query["content_types"]["style"] == "form" and query["content_types"]["explode"] is False
    assert document["components"]["schemas"]["CreateJobRequest"]["properties"]["content_type"]["enum"] == \
        ["audio", "pdf"]


def test_poll_body_takes_a_comma_list_or_a_json_list(document):
    prop = document["components"]["schemas"]["PollRequest"]["properties"]["content_types"]
    assert [alt["type"] for alt in prop["anyOf"]] == ["string", "array"]


def test_operation_ids_are_unique(document):
    ids = [operation["operationId"] for _, _, operation in _operations(document)]
    assert len(ids) == len(set(ids))
