"""Ten thousand adapters uploaded through the real API, listed page by page, fifty served in one burst.

The adapters share PEFT's default location seed (as FourierFT fine-tunes of one base model do),
so the bank keeps one location set per layer and 10,000 coefficient rows. The fifty generations
are checked against an independent oracle: the base model with each adapter's dense dW merged
into its weights, decoded greedily by transformers' ``generate``.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.model_runner import ModelRunner
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.dense import delta_weight
from server.spectral.formats import native
from server.spectral.fourierft import peft_locations
from tests.conftest import greedy_continuation, load_base
from tests.http_fixtures import start_server, stop_server

ADAPTERS = 10_000
SERVED = 50
N_FREQUENCY = 16
PROMPT = "Ten thousand adapters"
NEW_TOKENS = 8


def _adapter(shapes: dict[str, tuple[int, int]], index: int) -> SpectralAdapter:
    generator = torch.Generator().manual_seed(index)
    modules = {}
    for name, shape in shapes.items():
        if name.endswith(("q_proj", "v_proj")):
            rows, cols = peft_locations(777, shape, N_FREQUENCY)
            modules[name] = ModuleSpectrum(torch.randn(N_FREQUENCY, generator=generator), rows, cols, shape, 150.0)
    return SpectralAdapter("fourierft", modules, norm="backward", seed=777)


def _merged_greedy(model_dir: Path, adapter: SpectralAdapter, prompt_ids: list[int]) -> list[int]:
    model = load_base(model_dir)
    with torch.no_grad():
        for name in adapter.modules:
            model.get_submodule(name).weight += delta_weight(adapter, name)
    return greedy_continuation(model, prompt_ids, NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ten_thousand_uploaded_adapters_list_fully_and_fifty_serve_correctly_at_once(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    shapes = ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes
    ids = [f"fleet/customer-{index:05d}" for index in range(ADAPTERS)]
    server = start_server(tiny_llama_dir, tmp_path, {}, "--log-level", "warning")
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:

            def upload(index: int) -> str:
                data = native.to_bytes(_adapter(shapes, index))
                response = client.post(
                    "/v1/adapters", data={"adapter_id": ids[index]}, files={"file": ("a.safetensors", data)}
                )
                assert response.status_code == 201, response.text
                return response.json()["sha256"]

            with ThreadPoolExecutor(8) as pool:
                shas = list(pool.map(upload, range(ADAPTERS)))

            listed, after = [], ""
            while True:
                page = client.get("/v1/adapters", params={"limit": 1000, "after": after}).json()
                listed += [(item["id"], item["sha256"]) for item in page["data"]]
                if not page["has_more"]:
                    break
                after = page["last_id"]
            assert listed == sorted(zip(ids, shas, strict=True))
            prefixed = client.get("/v1/adapters", params={"prefix": "fleet/customer-0999"}).json()["data"]
            assert [item["id"] for item in prefixed] == [f"fleet/customer-0999{digit}" for digit in range(10)]
            models = client.get("/v1/models").json()["data"]
            assert len(models) == ADAPTERS + 1

            chosen = random.Random(7).sample(range(ADAPTERS), SERVED)

            def generate(index: int) -> list[int]:
                parameters = {"adapter_id": ids[index], "max_new_tokens": NEW_TOKENS, "details": True}
                response = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
                assert response.status_code == 200, response.text
                return [token["id"] for token in response.json()["details"]["tokens"]]

            with ThreadPoolExecutor(SERVED) as pool:
                served = list(pool.map(generate, chosen))
            info = client.get("/info").json()["adapters"]
            assert info["registered"] == ADAPTERS and info["resident"] == SERVED
    finally:
        stop_server(server)

    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama_dir).encode(PROMPT)
    expected = [_merged_greedy(tiny_llama_dir, _adapter(shapes, index), prompt_ids) for index in chosen]
    mismatched = [ids[index] for index, got, want in zip(chosen, served, expected, strict=True) if got != want]
    assert not mismatched, f"{len(mismatched)} of {SERVED} adapters generated wrong tokens: {mismatched[:5]}"
    assert len({tuple(tokens) for tokens in served}) > 1, "the adapters should not all generate the same tokens"
