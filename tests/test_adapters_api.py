"""The adapter store over HTTP against real ``spectra serve`` processes.

Uploads (native and PEFT), versions and pins, hot-swap during a stream, listing, downloads that
PEFT loads, every rejection leaving the store unchanged, vLLM's load/unload endpoints, and LRU
residency within ``--adapter-memory``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save as save_safetensors

from server.engine.adapters import resident_cost
from server.engine.model_runner import ModelRunner
from server.spectral.formats import native
from server.spectral.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import load_base
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

MAX_ADAPTER_BYTES = 64 * 1024
TOKENS = 16
FileParts = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def shapes(tiny_llama_dir: Path) -> dict[str, tuple[int, int]]:
    return ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes


@pytest.fixture(scope="module")
def import_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def store_server(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], import_root: Path, tmp_path_factory
) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("store-api"),
        {"alpha": peft_adapter_dirs["alpha"]},
        "--import-root",
        str(import_root),
        "--max-adapter-bytes",
        str(MAX_ADAPTER_BYTES),
    )
    yield server
    stop_server(server)


def upload(server: Server, adapter_id: str, files: FileParts, **form: str) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/adapters",
        data={"adapter_id": adapter_id, **form},
        files=[("file", (name, data)) for name, data in files],
        timeout=30,
    )


def native_file(shapes: dict[str, tuple[int, int]], seed: int, **kwargs) -> FileParts:
    return [("adapter.safetensors", native.to_bytes(random_adapter(shapes, seed, **kwargs)))]


def peft_files(directory: Path) -> FileParts:
    return [(name, (directory / name).read_bytes()) for name in (CONFIG_NAME, WEIGHTS_NAME)]


def greedy(server: Server, adapter_id: str | None, tokens: int = TOKENS) -> list[int]:
    parameters = {"max_new_tokens": tokens, "details": True, "adapter_id": adapter_id}
    response = httpx.post(
        f"{server.base_url}/generate", json={"inputs": "Spectral", "parameters": parameters}, timeout=60
    )
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def store_snapshot(server: Server) -> tuple:
    listing = httpx.get(f"{server.base_url}/v1/adapters", params={"limit": 1000}).json()["data"]
    store_dir = server.log_path.parent / "adapters"
    files = sorted(str(path.relative_to(store_dir)) for path in store_dir.rglob("*") if path.is_file())
    blob_files = [name for name in files if name.startswith("blobs/")]
    return [(item["id"], item["version"], item["sha256"]) for item in listing], blob_files


def test_a_native_upload_is_servable_by_the_next_request_and_downloads_byte_for_byte(
    store_server: Server, shapes
) -> None:
    files = native_file(shapes, 101)
    data = files[0][1]
    response = upload(store_server, "team/native", files, description="d", metadata='{"owner": "qa"}')
    assert response.status_code == 201, response.text
    body = response.json()
    assert {key: body[key] for key in ("id", "version", "method", "size_bytes", "sha256", "base_model")} == {
        "id": "team/native",
        "version": 1,
        "method": "fourierft",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "base_model": store_server.model_name,
    }
    assert body["n_params"] == sum(s.n for s in native.from_bytes(data).modules.values())
    assert body["metadata"] == {"owner": "qa"} and isinstance(body["created_at"], int)
    assert greedy(store_server, "team/native") != greedy(store_server, None)
    download = httpx.get(f"{store_server.base_url}/v1/adapters/team/native/download")
    assert download.status_code == 200 and download.content == data
    assert download.headers["x-adapter-sha256"] == body["sha256"]


def test_an_uploaded_peft_directory_serves_like_the_same_adapter_loaded_at_start(
    store_server: Server, peft_adapter_dirs: dict[str, Path]
) -> None:
    response = upload(store_server, "uploaded/alpha", peft_files(peft_adapter_dirs["alpha"]))
    assert response.status_code == 201, response.text
    assert response.json()["source_format"] == "peft"
    assert greedy(store_server, "uploaded/alpha") == greedy(store_server, "alpha")


def test_the_peft_download_is_a_zip_that_peft_loads_with_identical_outputs(
    store_server: Server, peft_adapter_dirs: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    assert upload(store_server, "zip/alpha", peft_files(peft_adapter_dirs["alpha"])).status_code == 201
    download = httpx.get(f"{store_server.base_url}/v1/adapters/zip/alpha/download", params={"format": "peft"})
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == [CONFIG_NAME, WEIGHTS_NAME]
        archive.extractall(tmp_path / "unzipped")
    inputs = torch.tensor([[5, 9, 77, 31, 2]])
    with torch.no_grad():
        original = PeftModel.from_pretrained(load_base(tiny_llama_dir), peft_adapter_dirs["alpha"]).eval()(inputs)
        exported = PeftModel.from_pretrained(load_base(tiny_llama_dir), tmp_path / "unzipped").eval()(inputs)
    assert torch.equal(original.logits, exported.logits)


def test_sdctft_has_no_peft_form_and_says_to_download_native(store_server: Server, shapes) -> None:
    assert upload(store_server, "dct", native_file(shapes, 5, method="sdctft")).status_code == 201
    response = httpx.get(f"{store_server.base_url}/v1/adapters/dct/download", params={"format": "peft"})
    assert "native format" in error_of(response, 422)


def test_versions_are_pinned_by_id_at_n_and_deleted_one_by_one(store_server: Server, shapes) -> None:
    base = store_server.base_url
    assert upload(store_server, "ver", native_file(shapes, 1)).json()["version"] == 1
    first = greedy(store_server, "ver")
    assert upload(store_server, "ver", native_file(shapes, 2)).json()["version"] == 2
    second = greedy(store_server, "ver")
    assert first != second
    assert greedy(store_server, "ver@1") == first and greedy(store_server, "ver@2") == second
    detail = httpx.get(f"{base}/v1/adapters/ver").json()
    assert detail["version"] == 2 and [v["version"] for v in detail["versions"]] == [1, 2]
    assert httpx.get(f"{base}/v1/adapters/ver@1").json()["version"] == 1

    assert httpx.delete(f"{base}/v1/adapters/ver@2").json() == {
        "id": "ver",
        "object": "adapter.deleted",
        "deleted": True,
        "versions": [2],
    }
    assert httpx.get(f"{base}/v1/adapters/ver").json()["version"] == 1
    assert greedy(store_server, "ver") == first
    assert httpx.delete(f"{base}/v1/adapters/ver").json()["versions"] == [1]
    assert "not found" in error_of(httpx.get(f"{base}/v1/adapters/ver"), 404)
    response = httpx.post(f"{base}/generate", json={"inputs": "x", "parameters": {"adapter_id": "ver"}})
    assert "not found" in error_of(response, 404)
    assert "not found" in error_of(httpx.delete(f"{base}/v1/adapters/ver"), 404)


def _stream_tokens_while(server: Server, adapter_id: str, tokens: int, change) -> list[int]:
    """Greedy-stream ``adapter_id``; after the first token call ``change()`` (while the stream still runs)."""
    body = {"inputs": "Spectral", "parameters": {"adapter_id": adapter_id, "max_new_tokens": tokens}}
    received: list[int] = []
    with httpx.stream("POST", f"{server.base_url}/generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            received.append(json.loads(line.removeprefix("data:"))["token"]["id"])
            if len(received) == 1:
                change()
                assert httpx.get(f"{server.base_url}/info").json()["running_requests"] >= 1, "stream ended too soon"
    return received


def test_replacing_or_deleting_an_adapter_mid_stream_never_changes_the_stream(store_server: Server, shapes) -> None:
    long = 600
    assert upload(store_server, "swap", native_file(shapes, 31)).status_code == 201
    reference = greedy(store_server, "swap@1", long)

    replaced = _stream_tokens_while(
        store_server, "swap", long, lambda: upload(store_server, "swap", native_file(shapes, 32)).raise_for_status()
    )
    assert replaced == reference
    assert greedy(store_server, "swap", TOKENS) != reference[:TOKENS]

    deleted = _stream_tokens_while(
        store_server, "swap@1", long, lambda: httpx.delete(f"{store_server.base_url}/v1/adapters/swap@1")
    )
    assert deleted == reference
    assert httpx.get(f"{store_server.base_url}/v1/adapters/swap@1").status_code == 404


def test_listing_pages_through_a_prefix_with_a_cursor(store_server: Server, shapes) -> None:
    ids = [f"page/a{index}" for index in range(7)]
    for index, adapter_id in enumerate(ids):
        assert upload(store_server, adapter_id, native_file(shapes, 200 + index)).status_code == 201
    seen, after, pages = [], "", []
    while True:
        page = httpx.get(
            f"{store_server.base_url}/v1/adapters", params={"prefix": "page/", "after": after, "limit": 3}
        ).json()
        pages.append((len(page["data"]), page["has_more"]))
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(ids)
    assert pages == [(3, True), (3, True), (1, False)]


def _peft_config(**overrides) -> bytes:
    config = {"peft_type": "FOURIERFT", "n_frequency": 4, "scaling": 1.0, "random_loc_seed": 1} | overrides
    return json.dumps(config).encode()


def _rejections(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, str, FileParts, dict, int, str]]:
    """(case, adapter id, files, extra form fields, status, message fragment)."""
    good = native_file(shapes, 7)
    data = good[0][1]
    foreign = {name: (d_out * 2, d_in) for name, (d_out, d_in) in shapes.items()}
    nan_adapter = random_adapter(shapes, 8)
    next(iter(nan_adapter.modules.values())).coefficients[3] = math.nan
    peft_weights = save_safetensors(
        {"base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum": torch.ones(4)}
    )
    unknown_module = save_safetensors({"base_model.model.model.layers.0.nope.fourierft_spectrum": torch.ones(4)})
    return [
        ("id with ..", "a..b", good, {}, 422, "invalid adapter id"),
        ("id with three parts", "a/b/c", good, {}, 422, "invalid adapter id"),
        ("id ending in /", "a/", good, {}, 422, "invalid adapter id"),
        ("id starting with /", "/a", good, {}, 422, "invalid adapter id"),
        ("id with a control character", "a\x01b", good, {}, 422, "invalid adapter id"),
        ("id too long", "x" * 65, good, {}, 422, "invalid adapter id"),
        ("reserved name", "team/download", good, {}, 422, "other than 'download'"),
        ("truncated safetensors", "t", [("a.safetensors", data[: len(data) // 2])], {}, 422, "not a valid safetensors"),
        ("not safetensors", "t", [("a.safetensors", b"\x00" * 64)], {}, 422, "safetensors"),
        ("pickle", "t", [("adapter_model.bin", b"\x80\x04pickle")], {}, 422, "never loaded"),
        ("peft lora", "t", [(CONFIG_NAME, _peft_config(peft_type="LORA")), (WEIGHTS_NAME, peft_weights)], {}, 415,
         "accepted PEFT types: FOURIERFT"),
        ("peft config alone", "t", [(CONFIG_NAME, _peft_config())], {}, 422, "expected either one native"),
        ("peft module not in the base", "t", [(CONFIG_NAME, _peft_config()), (WEIGHTS_NAME, unknown_module)], {},
         422, "does not exist in the base model"),
        ("another base model", "t", native_file(foreign, 9), {}, 422, "in the adapter but"),
        ("nan coefficient", "t", [("a.safetensors", native.to_bytes(nan_adapter))], {}, 422, "not finite"),
        ("over the size limit", "t", [("a.safetensors", b"\x00" * (MAX_ADAPTER_BYTES + 1))], {}, 413, "limit"),
        ("body over the limit", "t", [("a.safetensors", b"\x00" * (3 * MAX_ADAPTER_BYTES + (1 << 20)))], {}, 413,
         "larger than the limit"),
        ("metadata not json", "t", good, {"metadata": "{oops"}, 422, "metadata is not valid JSON"),
        ("metadata not an object", "t", good, {"metadata": "[1]"}, 422, "metadata must be a JSON object"),
        ("the same file twice", "t", good + good, {}, 422, "sent twice"),
        ("three files", "t", [*good, (CONFIG_NAME, _peft_config()), (WEIGHTS_NAME, peft_weights)], {}, 422,
         "got files"),
        ("no file", "t", [], {}, 422, "file"),
    ]  # fmt: skip


def test_every_rejected_upload_says_why_and_leaves_the_store_unchanged(store_server: Server, shapes) -> None:
    before = store_snapshot(store_server)
    for case, adapter_id, files, form, status, fragment in _rejections(shapes):
        response = upload(store_server, adapter_id, files, **form)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        assert fragment in response.json()["error"]["message"], f"{case}: {response.text}"
        assert store_snapshot(store_server) == before, f"{case} changed the store"
    assert httpx.get(f"{store_server.base_url}/health").status_code == 200


def test_vllm_load_is_off_without_an_import_root(http_server: Server) -> None:
    response = httpx.post(f"{http_server.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert "--import-root" in error_of(response, 403)


def test_vllm_load_and_unload_within_the_import_root(
    store_server: Server, import_root: Path, peft_adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base = store_server.base_url
    shutil.copytree(peft_adapter_dirs["beta"], import_root / "beta")
    outside = tmp_path / "outside"
    shutil.copytree(peft_adapter_dirs["beta"], outside)
    (import_root / "link").symlink_to(outside)

    def load(path: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "vllm-beta", "lora_path": path})

    for escaping in (str(outside), "../" + outside.name, "link", "/etc/passwd"):
        assert "must lie under the import root" in error_of(load(escaping), 403), escaping
    assert "does not exist" in error_of(load("missing"), 404)
    response = load(str(import_root / "beta"))
    assert response.status_code == 200 and "added successfully" in response.text
    models = [card["id"] for card in httpx.get(f"{base}/v1/models").json()["data"]]
    assert "vllm-beta" in models
    completion = httpx.post(f"{base}/v1/completions", json={"model": "vllm-beta", "prompt": "Hi", "max_tokens": 4})
    assert completion.status_code == 200, completion.text

    unload = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "vllm-beta"})
    assert unload.status_code == 200 and "removed successfully" in unload.text
    assert "vllm-beta" not in [card["id"] for card in httpx.get(f"{base}/v1/models").json()["data"]]
    again = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "vllm-beta"})
    assert "cannot be found" in error_of(again, 404)


def test_residency_stays_within_adapter_memory_and_evicted_adapters_come_back_identical(
    tiny_llama_dir: Path, shapes, tmp_path_factory
) -> None:
    from tests.http_fixtures import start_server, stop_server

    adapters = [random_adapter(shapes, 300 + index) for index in range(5)]
    budget = 2 * resident_cost(adapters[0])
    server = start_server(tiny_llama_dir, tmp_path_factory.mktemp("lru"), {}, "--adapter-memory", str(budget))
    try:
        for index, adapter in enumerate(adapters[:4]):
            assert upload(server, f"lru{index}", [("a.safetensors", native.to_bytes(adapter))]).status_code == 201
        first = [greedy(server, f"lru{index}") for index in range(4)]
        info = httpx.get(f"{server.base_url}/info").json()["adapters"]
        assert info["resident"] == 2 and info["resident_bytes"] <= budget
        assert [greedy(server, f"lru{index}") for index in range(4)] == first

        pinned = upload(server, "pinned", [("a.safetensors", native.to_bytes(adapters[4]))], pin="true")
        assert pinned.status_code == 201 and pinned.json()["pinned"] is True
        for index in range(4):
            greedy(server, f"lru{index}")
        assert httpx.get(f"{server.base_url}/info").json()["adapters"]["resident"] == 2
        second_pin = upload(server, "pinned2", [("a.safetensors", native.to_bytes(adapters[0]))], pin="true")
        assert second_pin.status_code == 201, second_pin.text
        response = httpx.post(f"{server.base_url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "lru0"}})
        assert "--adapter-memory" in error_of(response, 429) and response.headers["retry-after"] == "1"
        assert greedy(server, "pinned2") == first[0], "pinned2 holds lru0's coefficients"
    finally:
        stop_server(server)
