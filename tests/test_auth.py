"""API keys against a real server: authentication, scopes, namespaces, per-key concurrency, exposure.

The keys file is written with the real ``spectra keys create`` command, and the server re-reads it
while running. Every check is over HTTP (httpx, the openai SDK, raw sockets).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from clients.sdk import SpectraClient
from server.api.auth import KeyRing, KeysFileError, hash_key, read_keys_file
from server.engine.model_runner import ModelRunner
from server.spectral.formats import native
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (namespace, scopes, max_concurrent_requests)
KEYS: dict[str, tuple[str, list[str], int | None]] = {
    "acme-rw": ("acme", ["inference", "adapters:write", "finetune"], None),
    "acme-infer": ("acme", ["inference"], None),
    "globex": ("globex", ["inference", "adapters:write", "finetune"], 2),
    "ops": ("ops", ["admin"], None),
}
TRAINING_ROWS = [{"prompt": "Spectral", "completion": " adapters"}, {"prompt": "Fourier", "completion": " basis"}]


def create_key(keys_file: Path, name: str, namespace: str, scopes: list[str], limit: int | None) -> str:
    """Runs ``spectra keys create``, appends its entry to the keys file and returns the key."""
    command = [sys.executable, "-m", "clients.cli", "keys", "create", "--name", name, "--namespace", namespace]
    command += [arg for scope in scopes for arg in ("--scope", scope)]
    if limit is not None:
        command += ["--max-concurrent-requests", str(limit)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    key = result.stderr.strip().rsplit(" ", 1)[-1]
    assert key.startswith("sk-spectra-") and key not in result.stdout
    with keys_file.open("a") as file:
        file.write(result.stdout + "\n")
    return key


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.toml"


@pytest.fixture(scope="module")
def keys(keys_file: Path) -> dict[str, str]:
    return {name: create_key(keys_file, name, *spec) for name, spec in KEYS.items()}


@pytest.fixture(scope="module")
def keyed_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], keys_file: Path, keys: dict[str, str], tmp_path_factory
) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("keyed"),
        {"alpha": peft_adapter_dirs["alpha"]},
        "--api-keys-file",
        str(keys_file),
        api_key=keys["ops"],
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def adapter_file(tiny_llama_dir: Path) -> bytes:
    shapes = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes
    return native.to_bytes(random_adapter(shapes, 5))


def call(server: Server, key: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=60, **kwargs)


def upload(server: Server, key: str, adapter_id: str, data: bytes, **form: str) -> httpx.Response:
    files = [("file", ("adapter.safetensors", data))]
    return call(server, key, "POST", "/v1/adapters", data={"adapter_id": adapter_id, **form}, files=files)


def generate(server: Server, key: str, adapter_id: str | None) -> httpx.Response:
    body = {"inputs": "Spectral", "parameters": {"max_new_tokens": 4, "adapter_id": adapter_id}}
    return call(server, key, "POST", "/generate", json=body)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def listed(server: Server, key: str) -> set[str]:
    adapters = {item["id"] for item in call(server, key, "GET", "/v1/adapters").json()["data"]}
    models = {card["id"] for card in call(server, key, "GET", "/v1/models").json()["data"]}
    assert adapters | {server.model_name} == models
    return adapters


def test_requests_without_a_valid_key_get_401_and_open_paths_stay_open(keyed_server: Server) -> None:
    for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/v1/adapters"), ("GET", "/info")]:
        missing = call(keyed_server, None, method, path)
        assert "requires an API key" in error_of(missing, 401)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert "not valid" in error_of(call(keyed_server, "sk-spectra-wrong", method, path), 401)
    # Unknown routes answer 401 too, so an unauthenticated caller learns nothing about the API.
    assert call(keyed_server, None, "GET", "/no/such/route").status_code == 401
    for path in ("/health", "/metrics", "/openapi.json"):
        assert call(keyed_server, None, "GET", path).status_code == 200, path


def test_each_route_needs_its_scope(keyed_server: Server, keys: dict[str, str], adapter_file: bytes) -> None:
    reader = keys["acme-infer"]
    assert generate(keyed_server, reader, None).status_code == 200
    assert "'adapters:write' scope" in error_of(upload(keyed_server, reader, "x", adapter_file), 403)
    assert "'adapters:write' scope" in error_of(call(keyed_server, reader, "DELETE", "/v1/adapters/alpha"), 403)
    assert "'finetune' scope" in error_of(call(keyed_server, reader, "GET", "/v1/files"), 403)
    assert "'finetune' scope" in error_of(call(keyed_server, reader, "GET", "/v1/fine_tuning/jobs"), 403)
    load = call(keyed_server, reader, "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"})
    assert "'adapters:write' scope" in error_of(load, 403)
    # Reading the store needs no write scope; the admin scope grants every other one.
    assert call(keyed_server, reader, "GET", "/v1/adapters").status_code == 200
    assert call(keyed_server, keys["ops"], "GET", "/v1/files").status_code == 200


def test_adapters_are_private_to_their_namespace_and_others_get_404(
    keyed_server: Server, keys: dict[str, str], adapter_file: bytes
) -> None:
    created = upload(keyed_server, keys["acme-rw"], "support", adapter_file)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "acme/support" and created.json()["public"] is False
    # A bare name means the key's own namespace first; the full id works as well.
    for ref in ("support", "acme/support", "acme/support@1"):
        assert generate(keyed_server, keys["acme-infer"], ref).status_code == 200, ref
    assert "acme/support" in listed(keyed_server, keys["acme-infer"])

    globex = keys["globex"]
    never_uploaded = error_of(generate(keyed_server, globex, "acme/nothing"), 404)
    assert error_of(generate(keyed_server, globex, "acme/support"), 404) == never_uploaded.replace("nothing", "support")
    for method, path in [
        ("GET", "/v1/adapters/acme/support"),
        ("GET", "/v1/adapters/acme/support/download"),
        ("DELETE", "/v1/adapters/acme/support"),
    ]:
        assert "not found" in error_of(call(keyed_server, globex, method, path), 404), path
    completion = call(
        keyed_server, globex, "POST", "/v1/completions", json={"model": "acme/support", "prompt": "x", "max_tokens": 2}
    )
    assert "not found" in error_of(completion, 404)
    assert "acme/support" not in listed(keyed_server, globex)
    # The server's own adapters (from --adapter) serve every key.
    assert "alpha" in listed(keyed_server, globex)
    assert generate(keyed_server, globex, "alpha").status_code == 200
    # A namespace's bare name does not reach another namespace's adapter of that name.
    assert "not found" in error_of(generate(keyed_server, globex, "support"), 404)
    # Writing into another namespace is refused whatever exists there.
    assert "its namespace only" in error_of(upload(keyed_server, globex, "acme/support", adapter_file), 403)
    assert "its namespace only" in error_of(upload(keyed_server, globex, "acme/new", adapter_file), 403)
    # The admin sees and serves every namespace.
    assert "acme/support" in listed(keyed_server, keys["ops"])
    assert generate(keyed_server, keys["ops"], "acme/support").status_code == 200


def test_a_public_adapter_serves_every_key_but_only_its_namespace_deletes_it(
    keyed_server: Server, keys: dict[str, str], adapter_file: bytes
) -> None:
    assert upload(keyed_server, keys["acme-rw"], "shared", adapter_file, public="true").json()["public"] is True
    globex = keys["globex"]
    assert generate(keyed_server, globex, "acme/shared").status_code == 200
    assert "acme/shared" in listed(keyed_server, globex)
    assert "not in the namespace" in error_of(call(keyed_server, globex, "DELETE", "/v1/adapters/acme/shared"), 403)
    # A new private version hides the adapter again, old versions included.
    assert upload(keyed_server, keys["acme-rw"], "shared", adapter_file).json()["version"] == 2
    assert error_of(generate(keyed_server, globex, "acme/shared@1"), 404)
    assert call(keyed_server, keys["acme-rw"], "DELETE", "/v1/adapters/shared").json()["versions"] == [1, 2]


def _training_file(server: Server, key: str) -> str:
    data = "".join(json.dumps(row) + "\n" for row in TRAINING_ROWS).encode()
    response = call(server, key, "POST", "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_files_and_jobs_are_private_and_a_jobs_adapter_lands_in_its_namespace(
    keyed_server: Server, keys: dict[str, str]
) -> None:
    acme, globex = keys["acme-rw"], keys["globex"]
    file_id = _training_file(keyed_server, acme)
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert "not found" in error_of(call(keyed_server, globex, "GET", path), 404)
    assert "not found" in error_of(call(keyed_server, globex, "DELETE", f"/v1/files/{file_id}"), 404)
    assert file_id not in {item["id"] for item in call(keyed_server, globex, "GET", "/v1/files").json()["data"]}
    job_body = {
        "model": keyed_server.model_name,
        "training_file": file_id,
        "suffix": "tenant",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
        "adapter": {"n_frequency": 50},
    }
    stolen = call(keyed_server, globex, "POST", "/v1/fine_tuning/jobs", json=job_body)
    assert "not found" in error_of(stolen, 404) and error_of(stolen, 404).startswith("file")

    job = call(keyed_server, acme, "POST", "/v1/fine_tuning/jobs", json=job_body).json()
    for method, path in [("GET", ""), ("GET", "/events"), ("GET", "/checkpoints"), ("POST", "/cancel")]:
        response = call(keyed_server, globex, method, f"/v1/fine_tuning/jobs/{job['id']}{path}")
        assert "not found" in error_of(response, 404), path
    assert job["id"] not in {j["id"] for j in call(keyed_server, globex, "GET", "/v1/fine_tuning/jobs").json()["data"]}
    deadline = time.monotonic() + 180
    while job["status"] not in {"succeeded", "failed", "cancelled"} and time.monotonic() < deadline:
        time.sleep(0.5)
        job = call(keyed_server, acme, "GET", f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"].startswith("acme/ft-tenant-")
    assert generate(keyed_server, acme, job["fine_tuned_model"].removeprefix("acme/")).status_code == 200
    assert error_of(generate(keyed_server, globex, job["fine_tuned_model"]), 404)


def _hold_request(server: Server, key: str) -> socket.socket:
    """A request whose body never finishes arriving: in flight until the socket closes."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
    )
    return sock


def test_a_key_over_its_concurrency_limit_gets_429_and_others_are_unaffected(
    keyed_server: Server, keys: dict[str, str]
) -> None:
    held = [_hold_request(keyed_server, keys["globex"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        refused = call(keyed_server, keys["globex"], "GET", "/v1/models")
        assert "2 requests in flight" in error_of(refused, 429)
        assert refused.headers["Retry-After"] == "1"
        assert call(keyed_server, keys["acme-infer"], "GET", "/v1/models").status_code == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while call(keyed_server, keys["globex"], "GET", "/v1/models").status_code == 429:
        assert time.monotonic() < deadline, "the held requests never released their slots"
        time.sleep(0.2)


def test_the_client_libraries_authenticate_with_their_keys(keyed_server: Server, keys: dict[str, str]) -> None:
    hub = InferenceClient(base_url=keyed_server.base_url, token=keys["acme-infer"])
    assert hub.text_generation("Spectral", max_new_tokens=3, details=True).details.generated_tokens == 3
    with pytest.raises(HfHubHTTPError, match="401"):
        InferenceClient(base_url=keyed_server.base_url, token="sk-spectra-wrong").text_generation("x", max_new_tokens=1)

    client = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key=keys["acme-infer"], max_retries=0)
    completion = client.completions.create(model=keyed_server.model_name, prompt="Spectral", max_tokens=3)
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    wrong = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="sk-spectra-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        wrong.models.list()


def test_an_edited_keys_file_applies_without_a_restart_and_a_broken_edit_keeps_the_keys(
    keyed_server: Server, keys: dict[str, str], keys_file: Path
) -> None:
    original = keys_file.read_text()
    try:
        added = create_key(keys_file, "late", "late", ["inference"], None)
        deadline = time.monotonic() + 10
        while call(keyed_server, added, "GET", "/v1/models").status_code != 200:
            assert time.monotonic() < deadline, "the new key was never accepted"
            time.sleep(0.3)
        keys_file.write_text(original + "\n[[keys]]\nname = 'broken'\n")
        time.sleep(2.5)
        assert call(keyed_server, added, "GET", "/v1/models").status_code == 200
        assert "keeping the" in keyed_server.log_tail(200)
    finally:
        keys_file.write_text(original)


def test_keys_never_reach_the_log(keyed_server: Server, keys: dict[str, str]) -> None:
    call(keyed_server, "sk-spectra-attempted-secret", "GET", "/v1/models")
    log = keyed_server.log_path.read_text()
    assert "unauthenticated request" in log
    for secret in [*keys.values(), "sk-spectra-attempted-secret"]:
        assert secret not in log


def test_without_keys_a_network_address_is_refused_unless_allowed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.http_fixtures import free_port, start_server, stop_server

    command = [
        sys.executable, "-m", "clients.cli", "serve", "--model", str(tiny_llama_dir),
        "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port()),
    ]  # fmt: skip
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0" in refused.stderr and "--allow-unauthenticated" in refused.stderr

    (tmp_path / "allowed").mkdir()
    server = start_server(tiny_llama_dir, tmp_path / "allowed", {}, "--host", "0.0.0.0", "--allow-unauthenticated")
    try:
        assert "open to its whole network" in server.log_tail(200)
    finally:
        stop_server(server)


def test_the_key_ring_matches_hashes_and_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "a"\nsha256 = "{hash_key("key-a")}"\nnamespace = "a"\nscopes = ["inference"]\n'
        f'[[keys]]\nname = "b"\nsha256 = "{hash_key("key-b")}"\nnamespace = "b"\nscopes = ["admin", "admin"]\n'
    )
    ring = KeyRing(keys_file=path, env_key="env-key", default_max_concurrent=7)
    assert ring.authenticate("key-a").namespace == "a"
    assert ring.authenticate("key-b").scopes == frozenset({"admin"})
    assert ring.authenticate("env-key").max_concurrent_requests == 7
    assert ring.authenticate("key-c") is None and ring.authenticate("") is None
    for text, fragment in [
        ("[[keys]]\nname = 'x'\n", "sha256: Field required"),
        (path.read_text().replace('"inference"', '"superuser"'), "scopes.0"),
        (path.read_text().replace('name = "b"', 'name = "a"'), "repeats the name a"),
        ("keys = [", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(KeysFileError, match=fragment):
            read_keys_file(path)


def test_the_sdk_and_cli_upload_public_adapters_and_files_with_a_key(
    keyed_server: Server, keys: dict[str, str], adapter_file: bytes, tmp_path: Path
) -> None:
    native_path = tmp_path / "adapter.safetensors"
    native_path.write_bytes(adapter_file)
    with SpectraClient(keyed_server.base_url, api_key=keys["acme-rw"]) as client:
        assert client.upload_adapter("sdk-public", native_path, public=True).id == "acme/sdk-public"
        training = tmp_path / "train.jsonl"
        training.write_text("".join(json.dumps(row) + "\n" for row in TRAINING_ROWS))
        shared_file = client.upload_file(training, public=True).id
    command = [
        sys.executable, "-m", "clients.cli", "adapters", "--url", keyed_server.base_url, "--api-key", keys["acme-rw"],
        "upload", "cli-private", str(native_path), "--json",
    ]  # fmt: skip
    uploaded = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert json.loads(uploaded.stdout)["public"] is False
    with SpectraClient(keyed_server.base_url, api_key=keys["globex"]) as client:
        visible = {adapter.id for adapter in client.iter_adapters()}
        assert "acme/sdk-public" in visible and "acme/cli-private" not in visible
        assert client.get_file(shared_file).id == shared_file
