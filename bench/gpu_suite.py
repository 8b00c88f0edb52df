"""The GPU suite: one command that measures what the engine issue asks of a GPU, in minutes.

On a Llama-3.1-8B-shaped model (random bf16 weights built on the device, no download) with q,v
FourierFT adapters (n=1000, PEFT's default location seed, so all share one location set per layer):

1. ``roofline``: the device's copy bandwidth (a large device-to-device copy, bytes read + written)
   and the decode roofline at batch B: ``B / (weight bytes / bandwidth)`` tokens/s;
2. ``base_decode``: the engine's decode tokens/s of the base model at batch 1, 64 and 256, and as a
   fraction of the roofline;
3. ``adapters``: 64 and 256 rows with distinct adapters, as a fraction of the base at that batch;
4. ``resident_10k``: 256 rows with distinct adapters while 10,000 adapters are resident in the bank;
5. ``ttft``: time to first token of one 512-token prompt on an idle engine (median of 5);
6. ``json_constrained``: 256 rows under a JSON-schema grammar (llguidance masks, unpacked and applied
   on the device) against the base model at that batch;
7. ``peers``: ``transformers``' ``generate_batch`` (base) and PEFT FourierFT (one adapter, one
   ``generate`` batch: PEFT cannot mix adapters in a batch) on the same device, same batch, same
   new tokens.

Decode tokens/s count from the moment every row has its first token to the last token, so prefill
is excluded; each cell generates ``--new-tokens`` per row. Writes ``results.json`` and
``results.md`` to ``--out``.

``--tiny --device cpu`` runs the same code on the default tiny model at small sizes (the test suite
does, in seconds), so a GPU's first minutes measure instead of debugging.

On the GPU machine (torch, transformers, peft there; no pydantic, no llguidance): carry the wheels that
``make gpu-wheels`` downloads into ``.whl`` and run::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 bench/gpu_suite.py --out $OUT/gpu
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
from transformers.utils import logging as hf_logging

from adapters_store.store import AdapterStore
from bench.common import generate_exactly
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.model_runner import ModelRunner
from server.engine.types import FinishEvent, GenerationRequest, Grammar, SamplingParams, TokenEvent
from server.models.embedded import tiny_llama_config
from server.models.tokenizer import build_byte_tokenizer
from server.settings import ServerSettings
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.formats.peft import to_peft_dir
from server.spectral.fourierft import peft_locations

LOCATION_SEED = 777
N_FREQUENCY = 1000
SCALING = 150.0
TARGETS = ("q_proj", "v_proj")


def llama_31_8b_config() -> LlamaConfig:
    tokenizer = build_byte_tokenizer()
    return LlamaConfig(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]
    adapter_rows: tuple[int, ...]
    resident: int
    new_tokens: int
    ttft_prompt: int
    max_total_tokens: int


FULL = Sizes(batches=(1, 64, 256), adapter_rows=(64, 256), resident=10_000, new_tokens=64, ttft_prompt=512,
             max_total_tokens=1024)  # fmt: skip
TINY = Sizes(batches=(1, 4, 8), adapter_rows=(4, 8), resident=100, new_tokens=8, ttft_prompt=64, max_total_tokens=256)


@functools.cache
def _locations(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT draws a randperm of d_out * d_in (16.7M at 4096 x 4096) per module: once per shape here.
    return peft_locations(LOCATION_SEED, shape, min(N_FREQUENCY, shape[0] * shape[1]))


def fourierft(shapes: dict[str, tuple[int, int]], index: int) -> SpectralAdapter:
    generator = torch.Generator().manual_seed(index)
    modules = {}
    for name, shape in sorted(shapes.items()):
        rows, cols = _locations(shape)
        modules[name] = ModuleSpectrum(torch.randn(rows.numel(), generator=generator), rows, cols, shape, SCALING)
    return SpectralAdapter("fourierft", modules, norm="backward", seed=LOCATION_SEED)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and written."""
    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(timings)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def prompt_ids(index: int, length: int) -> list[int]:
    """``length`` ids: bos, then bytes (the byte tokenizer maps ids 0-255 to bytes)."""
    return [256] + [(97 + index + position) % 26 + 97 for position in range(length - 1)]


def integer_array(new_tokens: int) -> Grammar:
    """A JSON array that cannot close within ``new_tokens`` (each item takes two tokens or more)."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": new_tokens}
    return Grammar("json_schema", json.dumps(schema))


async def decode_rate(
    engine: Engine, adapters: list[str | None], new_tokens: int, grammar: Grammar | None = None
) -> dict:
    """Decode tokens/s of one burst: from the moment every row has its first token to the end."""
    params = SamplingParams(max_new_tokens=new_tokens, grammar=grammar)
    handles = [
        engine.submit(GenerationRequest(prompt_ids(index, 16), params, {a: 1.0} if a else {}))
        for index, a in enumerate(adapters)
    ]

    async def consume(handle: RequestHandle) -> tuple[float, int]:
        first = None
        async for event in handle.events():
            if first is None and isinstance(event, TokenEvent):
                first = time.perf_counter()
            if isinstance(event, FinishEvent):
                assert first is not None, "a request ended without a token"
                return first, event.generated_tokens
        raise RuntimeError("no finish event")

    results = await asyncio.gather(*(consume(handle) for handle in handles))
    end = time.perf_counter()
    decode_tokens = sum(generated for _, generated in results) - len(handles)
    every_row_started = max(first for first, _ in results)
    return {"rows": len(handles), "tokens_per_s": round(decode_tokens / (end - every_row_started), 1)}


async def ttft(engine: Engine, length: int) -> float:
    samples = []
    for index in range(5):
        start = time.perf_counter()
        handle = engine.submit(GenerationRequest(prompt_ids(index, length), SamplingParams(max_new_tokens=1)))
        await handle.result()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peer_rates(config: LlamaConfig, sizes: Sizes, device: torch.device, dtype: torch.dtype, peft_dir: Path) -> dict:
    """``generate_batch`` (base) and PEFT FourierFT ``generate`` (one adapter) at the largest batch."""
    rows = max(sizes.batches)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    prompts = [prompt_ids(index, 16) for index in range(rows)]
    no_eos = {"eos_token_id": None, "do_sample": False}
    results = {}
    with torch.inference_mode():
        warm = GenerationConfig(max_new_tokens=2, min_new_tokens=2, **no_eos)
        model.generate_batch(prompts, generation_config=warm, progress_bar=False)
        generation = GenerationConfig(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, **no_eos)
        synchronize(device)
        start = time.perf_counter()
        outputs = model.generate_batch(prompts, generation_config=generation, progress_bar=False)
        synchronize(device)
        generated = sum(len(output.generated_tokens) for output in outputs.values())
        results["generate_batch"] = {"rows": rows, "tokens_per_s": round(generated / (time.perf_counter() - start), 1)}
        peft_model = PeftModel.from_pretrained(model, peft_dir).eval()
        input_ids = torch.tensor(prompts, device=device)
        generate_exactly(peft_model, input_ids, 2, pad_token_id=0)
        synchronize(device)
        start = time.perf_counter()
        output = generate_exactly(peft_model, input_ids, sizes.new_tokens, pad_token_id=0)
        synchronize(device)
        generated = (output.shape[1] - input_ids.shape[1]) * rows
        results["peft_one_adapter"] = {
            "rows": rows,
            "tokens_per_s": round(generated / (time.perf_counter() - start), 1),
        }
    del model, peft_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


async def engine_cells(
    engine: Engine, shapes: dict[str, tuple[int, int]], sizes: Sizes, roofline_per_row: float
) -> dict:
    """Every engine measurement, on one running engine; ``a0 ..`` are registered adapters."""
    in_use = max(sizes.adapter_rows)
    bank = engine.runner.bank
    await decode_rate(engine, [None] * max(sizes.batches), 2)
    await decode_rate(engine, [f"a{index}" for index in range(in_use)], 2)
    base = {}
    for batch in sizes.batches:
        cell = await decode_rate(engine, [None] * batch, sizes.new_tokens)
        cell["roofline_fraction"] = round(cell["tokens_per_s"] / (batch * roofline_per_row), 3)
        base[batch] = cell

    async def versus_base(rows: int) -> dict:
        cell = await decode_rate(engine, [f"a{index}" for index in range(rows)], sizes.new_tokens)
        base_cell = base.get(rows) or await decode_rate(engine, [None] * rows, sizes.new_tokens)
        return {**cell, "vs_base": round(cell["tokens_per_s"] / base_cell["tokens_per_s"], 3)}

    adapters = {rows: await versus_base(rows) for rows in sizes.adapter_rows}
    loaded = [bank.load(fourierft(shapes, in_use + index)) for index in range(sizes.resident - in_use)]
    resident = {**await versus_base(in_use), "resident": bank.resident_slots}
    for slot in loaded:
        bank.unload(slot)
    first_token_ms = round(1000 * await ttft(engine, sizes.ttft_prompt), 1)
    rows = max(sizes.batches)
    constrained = await decode_rate(engine, [None] * rows, sizes.new_tokens, integer_array(sizes.new_tokens))
    constrained["vs_base"] = round(constrained["tokens_per_s"] / base[rows]["tokens_per_s"], 3)
    return {
        "base_decode": base,
        "adapters": adapters,
        "resident_10k": resident,
        "ttft": {"prompt_tokens": sizes.ttft_prompt, "ms": first_token_ms},
        "json_constrained": constrained,
    }


def markdown(report: dict) -> str:
    roofline = report["roofline"]
    lines = [f"GPU suite on {report['device_name']} ({report['model']}), torch {report['torch']}", ""]
    lines += ["| measurement | rows | tok/s | ratio |", "|---|---|---|---|"]
    for batch, cell in report["base_decode"].items():
        lines.append(f"| base decode | {batch} | {cell['tokens_per_s']} | {cell['roofline_fraction']} of roofline |")
    for rows, cell in report["adapters"].items():
        lines.append(f"| distinct adapters | {rows} | {cell['tokens_per_s']} | {cell['vs_base']} of base |")
    cell = report["resident_10k"]
    lines.append(
        f"| {cell['resident']} resident, distinct in use | {cell['rows']} | {cell['tokens_per_s']} "
        f"| {cell['vs_base']} of base |"
    )
    cell = report["json_constrained"]
    lines.append(
        f"| JSON-schema rows (llguidance masks) | {cell['rows']} | {cell['tokens_per_s']} | {cell['vs_base']} of base |"
    )
    for name, cell in report["peers"].items():
        lines.append(f"| {name} | {cell['rows']} | {cell['tokens_per_s']} | Spectra / this: {cell['spectra_over']} |")
    lines += ["", f"TTFT of a {report['ttft']['prompt_tokens']}-token prompt at idle: {report['ttft']['ms']} ms"]
    lines.append(f"Copy bandwidth: {roofline['copy_gb_per_s']} GB/s; weights {roofline['weight_gb']} GB")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the default tiny model at small sizes (tests, CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    began = time.perf_counter()
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device)
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    config = tiny_llama_config() if args.tiny else llama_31_8b_config()
    work = Path(tempfile.mkdtemp(prefix="spectra-gpu-suite-"))

    runner = ModelRunner.from_config(config, build_byte_tokenizer(), dtype=dtype, device=args.device)
    shapes = {name: shape for name, shape in runner.module_shapes.items() if name.endswith(TARGETS)}
    registry = AdapterRegistry(
        runner.bank, runner.module_shapes, runner.architecture, AdapterStore(work / "store"), base_model="suite"
    )
    for index in range(max(sizes.adapter_rows)):
        registry.register(f"a{index}", fourierft(shapes, index))
    peft_dir = to_peft_dir(fourierft(shapes, 0), work / "peft", "suite")
    batch = max(sizes.batches)
    settings = ServerSettings(max_batch_size=batch, max_total_tokens=sizes.max_total_tokens, max_queue=4 * batch)
    engine = Engine(runner, registry, settings, "suite")
    runner.eos_token_ids = set()
    bandwidth = copy_bandwidth(device, 64 if args.tiny else 4096)
    weights = weight_bytes(runner.model)
    report: dict = {
        "model": "tiny llama" if args.tiny else "Llama-3.1-8B config, random weights",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "sizes": sizes.__dict__,
        "roofline": {"copy_gb_per_s": round(bandwidth / 1e9, 1), "weight_gb": round(weights / 1e9, 2)},
        "kv_cache_gb": round((runner.kv_cache.bytes if runner.kv_cache else 0) / 1e9, 2),
    }
    engine.start()
    try:
        report.update(asyncio.run(engine_cells(engine, shapes, sizes, bandwidth / weights)))
    finally:
        engine.stop()
    runner.kv_cache = None  # frees the KV cache and the served weights before the peers build their own
    runner.model.to("meta")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peers = peer_rates(config, sizes, device, getattr(torch, dtype), peft_dir)
    for cell in peers.values():
        cell["spectra_over"] = round(report["base_decode"][batch]["tokens_per_s"] / cell["tokens_per_s"], 2)
    report["peers"] = peers
    report["runtime_s"] = round(time.perf_counter() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
