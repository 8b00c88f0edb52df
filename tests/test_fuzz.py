"""Schema fuzzing: schemathesis drives every operation in ``/openapi.json`` against a real server.

The server has an API key and every request sends it. Each response must be no 5xx, have a
documented status code and content type, and match the documented schema. Generation stays fast
because the server's own limits bound it (a tiny ``--max-total-tokens``), not because the
generation routes are left out. Runs are reproducible: a fixed schemathesis seed, derandomized
Hypothesis, no example database.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.openapi import COMMON_ERRORS

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

SEED = 20240601
MAX_EXAMPLES = 25
# Prompt plus generated tokens (the prompt alone is at most 64, http_fixtures): no request generates more than 79.
MAX_TOTAL_TOKENS = 80
SMALL_UPLOAD_BYTES = 256 * 1024
LOADED_ID = "fuzz-loaded"
# Every fuzzed request carries an admin key, so the access middleware is on the path of all of them.
ADMIN_KEY = "sk-spectra-fuzz-admin"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Random optional fields almost never agree with each other (one output constraint, best_of >= n, top_logprobs
# with logprobs...), and random prompts rarely fit the input limit: each body also has a copy that keeps only its
# model and stream flag, with its prompt or messages cut to a short text, so that generation runs too.
SHORT_TEXT = 16


def _short(text: object) -> str:
    return text[:SHORT_TEXT] if isinstance(text, str) and text else "Hello"


def _plain(body: dict) -> dict:
    plain = {key: body[key] for key in ("model", "stream") if key in body}
    if "prompt" in body:
        plain["prompt"] = _short(body["prompt"])
    if "messages" in body:
        messages = [message for message in body["messages"] if isinstance(message, dict)] or [{}]
        plain["messages"] = [{"role": "user", "content": _short(message.get("content"))} for message in messages[:2]]
    return plain


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    import_root = tmp_path_factory.mktemp("fuzz-imports")
    shutil.copytree(peft_adapter_dirs["alpha"], import_root / "alpha")
    server = start_server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("fuzz-data"),
        peft_adapter_dirs,
        "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-adapter-bytes", str(SMALL_UPLOAD_BYTES),
        "--max-training-file-bytes", str(SMALL_UPLOAD_BYTES),
        "--import-root", str(import_root),
        "--api-key", ADMIN_KEY,
        api_key=ADMIN_KEY,
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    # An explicit config, so that a schemathesis.toml lying around cannot change the run. Sanitization
    # would mask every field named like "*token*" (max_new_tokens...) in failure reports.
    config = schemathesis.Config.from_dict({"seed": SEED, "output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=config)
    # Random names only reach the 404/422 paths: bodies also name the served model and adapters (OpenAI's
    # model), or the adapter in the import root (vLLM's load) and the id it is loaded as, so that
    # generation, loading and unloading run too. The fixture adapters themselves are never unloaded.
    overrides = {
        "model": [{"model": name} for name in (fuzz_server.model_name, *fuzz_server.adapter_dirs)],
        "lora_path": [{"lora_path": "alpha", "lora_name": LOADED_ID}],
        "lora_name": [{"lora_name": LOADED_ID}],
    }

    @schema.hook
    def flatmap_body(_: schemathesis.HookContext, body: object) -> st.SearchStrategy:
        if isinstance(body, dict):
            for field, changes in overrides.items():
                if isinstance(body.get(field), str):
                    variants = [{**body, **change} for change in changes]
                    plain = [_plain(variant) for variant in variants]
                    return st.sampled_from([body, *variants, *plain])
        return st.just(body)

    @schema.hook
    def flatmap_path_parameters(context: schemathesis.HookContext, parameters: object) -> st.SearchStrategy:
        # Reads also get the fixture adapters (and a pinned version); deletes only the loaded id.
        if not isinstance(parameters, dict) or "adapter_ref" not in parameters or context.operation is None:
            return st.just(parameters)
        refs = [LOADED_ID] if context.operation.method.upper() == "DELETE" else ["alpha", "beta@1", LOADED_ID]
        return st.sampled_from([parameters, *({**parameters, "adapter_ref": ref} for ref in refs)])

    return schema


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis's lazy (fixture-loaded) tests rename the test node through ``node._nodeid``, which
    # pytest 9.2 no longer has (its ids are structured now); giving it one keeps the run working.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30, headers=AUTH)


def test_the_fuzzed_requests_were_authorized_and_reached_the_handlers(fuzz_server: Server) -> None:
    """Runs after the fuzzing: a 401 is documented too, so without this a lost key would pass silently."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = httpx.get(f"{fuzz_server.base_url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(metrics) if f.name == "spectra_http_requests"]
    by_status: dict[str, float] = {}
    ok_routes = set()
    for sample in family.samples:
        if sample.name.endswith("_total"):
            by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + sample.value
            if sample.labels["status"].startswith("2"):
                ok_routes.add(sample.labels["route"])
    assert by_status.get("401", 0) == 0, by_status
    expected = {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"}
    assert expected <= ok_routes, (expected - ok_routes, by_status)


def test_every_error_is_documented_in_the_standard_shape(fuzz_server: Server) -> None:
    document = httpx.get(f"{fuzz_server.base_url}/openapi.json", timeout=10).json()
    assert "HTTPValidationError" not in json.dumps(document)
    standard = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert set(map(str, COMMON_ERRORS)) <= responses.keys(), f"{method} {path}"
            assert ("400" in responses) == ("requestBody" in operation), f"{method} {path}"
            errors = {status: response for status, response in responses.items() if int(status) >= 400}
            assert all(response["content"] == standard for response in errors.values()), f"{method} {path}"


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_extreme_sampling_settings_decode_greedily(fuzz_server: Server, field: str) -> None:
    """Found by the fuzzer: a denormal temperature or penalty made the logits inf, softmax NaN, and the
    sampler raised, failing the whole batch (503). Such settings now take their limit, the greedy token."""
    url = f"{fuzz_server.base_url}/generate"

    def tokens(**parameters: object) -> list[int]:
        body = {"inputs": "abc abc abc", "parameters": {"max_new_tokens": 4, "details": True, **parameters}}
        response = httpx.post(url, json=body, headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        return [token["id"] for token in response.json()["details"]["tokens"]]

    extreme = tokens(do_sample=True, seed=1, **{field: 5e-324})
    if field == "temperature":
        assert extreme == tokens(temperature=0)
    assert "Traceback" not in fuzz_server.log_tail(200)
