"""Spectra against the simplest alternatives a user could write, on one Llama-shaped model.

The engine issue's scenario: 32 concurrent greedy requests with 31-token prompts on a Llama-shaped
model with a 32,000-token vocabulary (hidden 512, 4 layers, 8 query / 2 key-value heads), at 64 and
768 new tokens, every competitor with the same prompts and 2 torch threads:

- ``http``: the real server as a subprocess, 32 concurrent ``POST /generate`` requests;
- ``engine``: the engine in-process;
- ``generate``: ``transformers`` ``generate`` on one batch of the 32 prompts (all the same length);
- ``generate_batch``: ``transformers``' own continuous batching (``generate_batch``);
- ``generate_tuned_allocator``: ``generate`` again, after the engine tuned glibc's allocator in this
  process (``server/engine/cpu_allocator.py``): how much of the gap that setting alone makes.

The model's output-head rows of the end tokens are zero, so their logit is 0 while the largest of
32,000 random logits is far above it: greedy decoding never stops early, and every competitor
generates exactly ``new_tokens`` per request (checked). Prints ratios, writes JSON.

Usage: ``PYTHONPATH=. .venv/bin/python bench/engine_vs_peers.py [--quick] [--out PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

from adapters_store.store import AdapterStore
from bench.common import (
    generate_exactly,
    load_1min,
    report_header,
    running_server,
    wait_for_quiet_machine,
    write_report,
)
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.types import GenerationRequest, SamplingParams
from server.models.embedded import save_tiny_model, tiny_llama_config
from server.models.tokenizer import build_byte_tokenizer
from server.settings import ServerSettings

ROWS = 32
PROMPT_TOKENS = 31
THREADS = 2
MODEL_CONFIG = {
    "vocab_size": 32_000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
TARGETS = {
    "http 768/64": 0.85,
    "http/generate at 768": 1.2,
    "http/generate_batch at 768": 2.0,
}


def save_bench_model(directory: Path) -> Path:
    save_tiny_model(directory, tiny_llama_config(**MODEL_CONFIG))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    end_tokens = GenerationConfig.from_pretrained(directory).eos_token_id
    with torch.no_grad():
        model.lm_head.weight[end_tokens] = 0.0
    model.save_pretrained(directory)
    return directory


def prompts() -> list[list[int]]:
    tokenizer = build_byte_tokenizer()
    texts = [f"request {index:02d}: the spectral adapters"[: PROMPT_TOKENS - 1] for index in range(ROWS)]
    encoded = [tokenizer.encode(text) for text in texts]
    assert all(len(ids) == PROMPT_TOKENS for ids in encoded)
    return encoded


def tokens_per_s(generated: int, seconds: float) -> float:
    return round(generated / seconds, 1)


def run_http(base_url: str, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    tokenizer = build_byte_tokenizer()
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch]

    async def burst() -> int:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

            async def one(text: str) -> int:
                response = await client.post(
                    "/generate", json={"inputs": text, "parameters": {"max_new_tokens": new_tokens, "details": True}}
                )
                response.raise_for_status()
                return response.json()["details"]["generated_tokens"]

            return sum(await asyncio.gather(*(one(text) for text in texts)))

    start = time.perf_counter()
    generated = asyncio.run(burst())
    return time.perf_counter() - start, generated


def run_engine(engine: Engine, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    async def burst() -> int:
        handles = [engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=new_tokens))) for ids in batch]
        return sum([(await handle.result()).generated_tokens for handle in handles])

    start = time.perf_counter()
    generated = asyncio.run(burst())
    return time.perf_counter() - start, generated


def run_generate(model: torch.nn.Module, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    input_ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        output = generate_exactly(model, input_ids, new_tokens)
    return time.perf_counter() - start, (output.shape[1] - input_ids.shape[1]) * len(batch)


def run_generate_batch(model: torch.nn.Module, batch: list[list[int]], new_tokens: int) -> tuple[float, int]:
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model.generate_batch(batch, generation_config=config, progress_bar=False)
    return time.perf_counter() - start, sum(len(output.generated_tokens) for output in outputs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 768])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell at the shortest length (median)")
    parser.add_argument("--quick", action="store_true", help="16 and 48 new tokens, one run: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_vs_peers.json"))
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = [16, 48], 1
    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    load_at_start = wait_for_quiet_machine(max_load=0.5, max_wait_s=300)
    batch = prompts()
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="spectra-peers-") as tmp:
        work = Path(tmp)
        model_dir = save_bench_model(work / "llama-h512-v32k")
        settings_args = ("--max-batch-size", str(ROWS), "--torch-threads", str(THREADS))

        def measure(name: str, run, new_tokens: int) -> None:
            run(max(2, new_tokens // 16))  # warm-up: the same shapes, a few tokens
            repeats = args.repeats if new_tokens == min(args.new_tokens) else 1
            timings = [run(new_tokens) for _ in range(repeats)]
            generated = {count for _, count in timings}
            if generated != {ROWS * new_tokens}:
                raise RuntimeError(f"{name} generated {generated} tokens, expected {ROWS * new_tokens}")
            seconds = statistics.median(wall for wall, _ in timings)
            results.setdefault(name, {})[new_tokens] = {
                "wall_s": round(seconds, 3),
                "tokens_per_s": tokens_per_s(ROWS * new_tokens, seconds),
                "runs": repeats,
            }
            print(f"  {name} @ {new_tokens} new tokens: {results[name][new_tokens]['tokens_per_s']} tok/s", flush=True)

        with running_server(work, "--model", str(model_dir), *settings_args) as server:
            for new_tokens in args.new_tokens:
                measure("http", lambda n: run_http(server.base_url, batch, n), new_tokens)

        # Plain transformers first, in a process whose allocator nothing has tuned yet: what a user gets.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for new_tokens in args.new_tokens:
            measure("generate", lambda n: run_generate(model, batch, n), new_tokens)
        paged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        for new_tokens in args.new_tokens:
            measure("generate_batch", lambda n: run_generate_batch(paged.eval(), batch, n), new_tokens)

        runner = ModelRunner(model_dir, dtype="float32", device="cpu")
        registry = AdapterRegistry(
            runner.bank, runner.module_shapes, runner.architecture, AdapterStore(work / "store"), base_model="bench"
        )
        engine = Engine(runner, registry, ServerSettings(max_batch_size=ROWS), "bench")
        engine.start()
        try:
            for new_tokens in args.new_tokens:
                measure("engine", lambda n: run_engine(engine, batch, n), new_tokens)
        finally:
            engine.stop()
        # The engine raised glibc's mmap/trim thresholds (server/engine/cpu_allocator.py) for this whole
        # process; generate again shows how much of the gap is that setting alone.
        for new_tokens in args.new_tokens:
            measure("generate_tuned_allocator", lambda n: run_generate(model, batch, n), new_tokens)

    short, long = min(args.new_tokens), max(args.new_tokens)
    rate = {name: {n: cell["tokens_per_s"] for n, cell in cells.items()} for name, cells in results.items()}
    ratios = {
        f"http {long}/{short}": round(rate["http"][long] / rate["http"][short], 3),
        f"engine {long}/{short}": round(rate["engine"][long] / rate["engine"][short], 3),
        f"http/generate at {long}": round(rate["http"][long] / rate["generate"][long], 3),
        f"engine/generate at {long}": round(rate["engine"][long] / rate["generate"][long], 3),
        f"http/generate_batch at {long}": round(rate["http"][long] / rate["generate_batch"][long], 3),
        f"http/generate_tuned_allocator at {long}": round(
            rate["http"][long] / rate["generate_tuned_allocator"][long], 3
        ),
        f"http/generate at {short}": round(rate["http"][short] / rate["generate"][short], 3),
    }
    print("ratios:")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  (target >= {target}: {'pass' if value >= target else 'MISS'})"
        print(f"  {name}: {value}{verdict}")
    report = report_header("engine_vs_peers", args, load_at_start, began)
    report.update({"model": MODEL_CONFIG, "rows": ROWS, "prompt_tokens": PROMPT_TOKENS, "results": results})
    report.update({"ratios": ratios, "targets": TARGETS, "load_1min_end": load_1min()})
    write_report(report, args.out)


if __name__ == "__main__":
    main()
