"""End-to-end serving throughput: one burst of concurrent requests, each with its own FourierFT adapter.

For each model, the same prompts (same token counts), greedy, the same ``max_new_tokens``, all submitted at once:

- (1) ``engine_base``: the in-process engine, no adapter;
- (2) ``engine_adapters``: the in-process engine, every request with its own adapter (one mixed batch);
- (3) ``peft``: PEFT on the same base weights with the same adapters loaded into one ``PeftModel``, one
  ``generate`` sub-batch per adapter (the only way PEFT FourierFT serves several adapters, see ``peft_burst``);
- (4) ``http_adapters``: the real server as a subprocess, streaming ``/generate_stream`` with ``adapter_id``.

Adapters: FourierFT, n_frequency 1000, scaling 150, on q_proj and v_proj, distinct random coefficients and
PEFT's default ``random_loc_seed`` 777 (so all share one location set per layer shape, as PEFT adapters made
with default settings do).

Usage: ``PYTHONPATH=. .venv/bin/python bench/serve_throughput.py [--quick] [--out PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from adapters_store.store import AdapterStore
from bench.common import (
    cpu_model,
    generate_exactly,
    load_1min,
    percentile,
    report_header,
    running_server,
    wait_for_quiet_machine,
    write_report,
)
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.handle import RequestHandle
from server.engine.model_runner import ModelRunner
from server.engine.types import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from server.models.embedded import DEFAULT_MODEL_NAME, ensure_default_model, save_tiny_model, tiny_llama_config
from server.settings import ServerSettings
from server.spectral.adapter import ModuleSpectrum, SpectralAdapter
from server.spectral.formats import native
from server.spectral.formats.peft import to_peft_dir
from server.spectral.fourierft import peft_locations

N_FREQUENCY = 1000
SCALING = 150.0
SEED = 777  # PEFT's default random_loc_seed
TARGET_SUFFIXES = ("q_proj", "v_proj")
LARGE_MODEL = "llama-h2048"
MODELS = (DEFAULT_MODEL_NAME, LARGE_MODEL)
# 8 key-value heads for 16 query heads (GQA, as in Llama) makes v_proj rectangular (2048 -> 1024).
LARGE_CONFIG = {
    "hidden_size": 2048,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 5632,
}
# The targets, checked on the hidden-2048 model only: (2)/(1) and (2)/(3) of generated tokens/s.
TARGETS = {"engine_adapters/engine_base": 0.90, "engine_adapters/peft": 3.0}
SCENARIO_LABELS = {
    "engine_base": "(1) engine, no adapter",
    "engine_adapters": "(2) engine, distinct adapters",
    "peft": "(3) PEFT, sub-batch per adapter",
    "http_adapters": "(4) HTTP, distinct adapters",
}
# Warm-ups use the real prompts (the same matmul shapes as the timed prefill) but only a couple of new tokens.
WARMUP_NEW_TOKENS = 2
FILLER = "the quick brown fox jumps over the lazy dog; "


@dataclass
class Burst:
    """One timed burst. ``ttft_s`` counts from the burst start, so queueing behind other requests is included."""

    requests: int
    generated_tokens: int
    wall_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    outputs: list[list[int]] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.generated_tokens / self.wall_s, 2),
            "ttft_p50_ms": round(1000 * percentile(self.ttft_s, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(self.ttft_s, 99), 1),
            "tpot_p50_ms": round(1000 * percentile(self.tpot_s, 50), 1) if self.tpot_s else None,
            "note": self.note,
        }


def make_prompts(count: int, tokens: int) -> list[str]:
    """ASCII texts of ``tokens - 1`` bytes: the byte tokenizer adds <|bos|>, so each is exactly ``tokens`` ids."""
    return [(f"request {index:03d}: " + FILLER * (1 + tokens // len(FILLER)))[: tokens - 1] for index in range(count)]


def make_adapters(shapes: dict[str, tuple[int, int]], count: int) -> list[SpectralAdapter]:
    targets = {name: shape for name, shape in shapes.items() if name.endswith(TARGET_SUFFIXES)}
    # Every adapter has seed 777, so the locations depend on the layer shape only: draw each once.
    locations = {shape: peft_locations(SEED, shape, N_FREQUENCY) for shape in set(targets.values())}
    adapters = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        modules = {
            name: ModuleSpectrum(torch.randn(N_FREQUENCY, generator=generator), *locations[shape], shape, SCALING)
            for name, shape in sorted(targets.items())
        }
        adapters.append(SpectralAdapter("fourierft", modules, norm="backward", seed=SEED))
    return adapters


def adapter_name(index: int) -> str:
    return f"fft{index:03d}"


# -- (1), (2): the in-process engine ----------------------------------------------------------------------------


async def engine_burst(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> Burst:
    start = time.perf_counter()
    handles = []
    for index, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        request = GenerationRequest(
            prompt_ids=prompt,
            params=SamplingParams(max_new_tokens=new_tokens),
            adapters={adapter: 1.0} if adapter else {},
            request_id=f"bench-{index}",
        )
        handles.append((time.perf_counter(), engine.submit(request)))

    async def consume(submitted: float, handle: RequestHandle) -> tuple[float, float, FinishEvent]:
        first = None
        async for event in handle.events():
            if isinstance(event, TokenEvent) and first is None:
                first = time.perf_counter()
            elif isinstance(event, FinishEvent):
                if first is None or event.reason == "cancelled":
                    raise RuntimeError(f"request {handle.request_id} ended without generating ({event.reason})")
                return first - submitted, time.perf_counter() - first, event
        raise RuntimeError(f"request {handle.request_id} ended without a finish event")

    results = await asyncio.gather(*(consume(submitted, handle) for submitted, handle in handles))
    wall = time.perf_counter() - start
    finishes = [finish for _, _, finish in results]
    return Burst(
        requests=len(prompts),
        generated_tokens=sum(finish.generated_tokens for finish in finishes),
        wall_s=wall,
        ttft_s=[ttft for ttft, _, _ in results],
        tpot_s=[decode / (f.generated_tokens - 1) for _, decode, f in results if f.generated_tokens > 1],
        outputs=[[token.token_id for token in finish.tokens] for finish in finishes],
    )


def engine_scenarios(
    runner: ModelRunner,
    adapters: list[SpectralAdapter],
    prompts: list[list[int]],
    work: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Burst], dict]:
    # The engine has no min_new_tokens; with no eos ids every request runs to max_new_tokens, as PEFT's
    # min_new_tokens=max_new_tokens forces in (3), so all scenarios generate the same number of tokens.
    runner.eos_token_ids = set()
    store = AdapterStore(work / f"store-{Path(runner.model_path).name}")
    registry = AdapterRegistry(
        runner.bank, runner.module_shapes, runner.architecture, store, base_model=Path(runner.model_path).name
    )
    for index, adapter in enumerate(adapters):
        registry.register(adapter_name(index), adapter)
    # All requests must fit in one batch: the burst is "everyone at once". The prefill budget stays the default.
    settings = ServerSettings(max_batch_size=len(prompts), max_queue=max(256, len(prompts)))
    engine = Engine(runner, registry, settings, Path(runner.model_path).name)
    names: dict[str, list[str | None]] = {
        "engine_base": [None] * len(prompts),
        "engine_adapters": [adapter_name(index) for index in range(len(prompts))],
    }

    async def run_all() -> dict[str, Burst]:
        bursts = {}
        for scenario, adapter_ids in names.items():
            # The warm-up also makes every adapter resident (slots load lazily on first use).
            await engine_burst(engine, prompts, adapter_ids, WARMUP_NEW_TOKENS)
            bursts[scenario] = await engine_burst(engine, prompts, adapter_ids, args.max_new_tokens)
            print(f"  {SCENARIO_LABELS[scenario]}: {bursts[scenario].summary()['tokens_per_s']} tok/s", flush=True)
        return bursts

    engine.start()
    try:
        bursts = asyncio.run(run_all())
    finally:
        engine.stop()
    info = {"limits": settings.limits(), "routed_layers": len(runner.module_shapes)}
    return bursts, info


# -- (3): PEFT ---------------------------------------------------------------------------------------------------


class FirstTokenStreamer(BaseStreamer):
    """Timestamps the first generated token: ``generate`` puts the prompt first, then each new token as it is
    sampled (on CPU transformers streams every step immediately; only MPS defers by one step)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        return None


def load_peft_model(model_dir: Path, peft_dirs: list[Path]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, peft_dirs[0], adapter_name=adapter_name(0))
    for index, directory in enumerate(peft_dirs[1:], start=1):
        model.load_adapter(directory, adapter_name=adapter_name(index))
    return model.eval()


def peft_generate(model: PeftModel, prompt: list[int], new_tokens: int, streamer: BaseStreamer | None) -> list[int]:
    input_ids = torch.tensor([prompt])
    output = generate_exactly(model, input_ids, new_tokens, streamer=streamer)
    return output[0, input_ids.shape[1] :].tolist()


def peft_burst(model: PeftModel, prompts: list[list[int]], new_tokens: int, budget_s: float) -> Burst:
    """PEFT serves several FourierFT adapters only as one sub-batch per adapter, run one after another.

    PEFT 0.21.2 has no mixed-adapter batch for FourierFT: ``FourierFTLayer.forward`` takes no ``adapter_names``
    and applies every *active* adapter to every row, and ``FourierFTModel`` has no ``_enable_peft_forward_hooks``,
    so ``PeftModel.generate(adapter_names=[...])`` silently drops the argument and runs the active adapter on all
    rows (checked: row 1 of a two-adapter batch came out identical to adapter 0's output). So: ``set_adapter``,
    then ``generate`` the rows of that adapter (one each here). A request's TTFT runs from the burst start to its
    first streamed token, so it includes waiting for the earlier adapters' sub-batches, which is what a PEFT
    user's queue sees.

    Sub-batches all have the same shape and cost, so when ``budget_s`` runs out the rest are extrapolated from
    the measured mean (duration and first-token offset); the note says how many were measured.
    """
    start = time.perf_counter()
    durations: list[float] = []
    first_offsets: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    outputs: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        if durations and time.perf_counter() - start > budget_s:
            break
        began = time.perf_counter()
        model.set_adapter(adapter_name(index))
        streamer = FirstTokenStreamer()
        outputs.append(peft_generate(model, prompt, new_tokens, streamer))
        ended = time.perf_counter()
        assert streamer.first_token_at is not None
        durations.append(ended - began)
        first_offsets.append(streamer.first_token_at - began)
        ttfts.append(streamer.first_token_at - start)
        if len(outputs[-1]) > 1:
            tpots.append((ended - streamer.first_token_at) / (len(outputs[-1]) - 1))
    measured = len(durations)
    wall = time.perf_counter() - start
    tokens = sum(len(output) for output in outputs)
    note = ""
    if measured < len(prompts):
        mean_duration = statistics.fmean(durations)
        mean_first = statistics.fmean(first_offsets)
        ttfts += [index * mean_duration + mean_first for index in range(measured, len(prompts))]
        wall = mean_duration * len(prompts)
        tokens = round(tokens / measured * len(prompts))
        note = f"{measured}/{len(prompts)} sub-batches measured ({budget_s:.0f}s budget), rest extrapolated"
    return Burst(len(prompts), tokens, wall, ttfts, tpots, outputs, note)


def peft_scenario(
    model_dir: Path, adapters: list[SpectralAdapter], prompts: list[list[int]], work: Path, args: argparse.Namespace
) -> tuple[Burst, dict]:
    peft_dirs = [to_peft_dir(adapter, work / "peft" / adapter_name(i)) for i, adapter in enumerate(adapters)]
    began = time.perf_counter()
    model = load_peft_model(model_dir, peft_dirs)
    load_s = time.perf_counter() - began
    model.set_adapter(adapter_name(0))
    peft_generate(model, prompts[0], WARMUP_NEW_TOKENS, None)
    burst = peft_burst(model, prompts, args.max_new_tokens, args.peft_budget_s)
    print(f"  {SCENARIO_LABELS['peft']}: {burst.summary()['tokens_per_s']} tok/s {burst.note}", flush=True)
    return burst, {"peft_load_s": round(load_s, 2)}


# -- (4): HTTP ---------------------------------------------------------------------------------------------------


async def http_burst(base_url: str, texts: list[str], adapters: list[str], new_tokens: int) -> Burst:
    """TTFT is the first SSE event at the client. The TGI stream holds each token until the engine's next event
    (the last token must carry ``details``), so it lands one engine step after the engine sampled it."""
    limits = httpx.Limits(max_connections=len(texts) + 4, max_keepalive_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one(text: str, adapter: str) -> tuple[float, float, list[int]]:
            body = {"inputs": text, "parameters": {"adapter_id": adapter, "max_new_tokens": new_tokens}}
            submitted = time.perf_counter()
            first = None
            tokens: list[int] = []
            async with client.stream("POST", "/generate_stream", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = json.loads(line.removeprefix("data:"))
                    if "token" not in payload:
                        raise RuntimeError(f"stream error: {payload}")
                    if first is None:
                        first = time.perf_counter()
                    tokens.append(payload["token"]["id"])
            if first is None:
                raise RuntimeError("stream ended without tokens")
            return first - submitted, time.perf_counter() - first, tokens

        start = time.perf_counter()
        results = await asyncio.gather(*(one(text, adapter) for text, adapter in zip(texts, adapters, strict=True)))
        wall = time.perf_counter() - start
    return Burst(
        requests=len(texts),
        generated_tokens=sum(len(tokens) for _, _, tokens in results),
        wall_s=wall,
        ttft_s=[ttft for ttft, _, _ in results],
        tpot_s=[decode / (len(tokens) - 1) for _, decode, tokens in results if len(tokens) > 1],
        outputs=[tokens for _, _, tokens in results],
        note="eos can end a stream early; tok/s counts tokens actually streamed",
    )


def http_scenario(
    model_dir: Path, adapters: list[SpectralAdapter], texts: list[str], work: Path, args: argparse.Namespace
) -> tuple[Burst, dict]:
    files = {}
    for index, adapter in enumerate(adapters):
        path = work / "native" / f"{adapter_name(index)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(native.to_bytes(adapter))
        files[adapter_name(index)] = path
    names = list(files)
    began = time.perf_counter()
    adapter_args = [arg for name, path in files.items() for arg in ("--adapter", f"{name}={path}")]
    # The same intra-op threads as the in-process scenarios, so (4) compares with (2).
    threads = str(torch.get_num_threads())
    serve_args = (
        "--model",
        str(model_dir),
        "--max-batch-size",
        str(len(texts)),
        "--torch-threads",
        threads,
        *adapter_args,
    )
    with running_server(work, *serve_args) as server:
        base_url = server.base_url
        start_s = time.perf_counter() - began
        # Warm-up with every adapter so that all bank slots are resident before the timed burst.
        asyncio.run(http_burst(base_url, texts, names, WARMUP_NEW_TOKENS))
        burst = asyncio.run(http_burst(base_url, texts, names, args.max_new_tokens))
    print(f"  {SCENARIO_LABELS['http_adapters']}: {burst.summary()['tokens_per_s']} tok/s", flush=True)
    return burst, {"server_start_s": round(start_s, 2)}


# -- driver ------------------------------------------------------------------------------------------------------


def build_model(name: str, work: Path) -> Path:
    if name == DEFAULT_MODEL_NAME:
        return ensure_default_model(work / "data")
    return save_tiny_model(work / "models" / name, tiny_llama_config(**LARGE_CONFIG))


def describe_model(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {key: config[key] for key in keys} | {"vocab_size": config["vocab_size"]}


def torch_ifft2_ok(shape: tuple[int, int]) -> bool:
    """Whether fp32 ``torch.fft.ifft2`` (PEFT's dW path) is right for ``shape``: an impulse must spread evenly.

    On this torch 2.13 CPU (MKL) build it returns ~1e-13 instead of 1/(M*N) for 2048x2048 with 2 threads (right
    with 1 thread, in fp64 and for the other shapes here). PEFT then applies a ~zero dW: its cost is real but its
    tokens differ from the engine's, so the row comparison below means nothing for such shapes.
    """
    impulse = torch.zeros(shape)
    impulse[1, 1] = 1.0
    return math.isclose(torch.fft.ifft2(impulse).abs().max().item(), 1.0 / (shape[0] * shape[1]), rel_tol=1e-3)


def same_rows(left: list[list[int]], right: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(left, right, strict=False))


def run_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    model_dir = build_model(name, work)
    runner = ModelRunner(model_dir, dtype="float32", device="cpu")
    adapters = make_adapters(runner.module_shapes, args.requests)
    texts = make_prompts(args.requests, args.prompt_tokens)
    prompts = [runner.tokenizer.encode(text) for text in texts]
    assert all(len(prompt) == args.prompt_tokens for prompt in prompts), "prompts must have equal token counts"
    print(f"model {name}: {describe_model(model_dir)}", flush=True)

    bursts, info = engine_scenarios(runner, adapters, prompts, work, args)
    # Free the engine's copy of the weights before PEFT loads its own.
    del runner
    gc.collect()
    bursts["peft"], peft_info = peft_scenario(model_dir, adapters, prompts, work, args)
    info |= peft_info
    gc.collect()
    if args.http == "all" or (args.http == "tiny" and name == DEFAULT_MODEL_NAME):
        bursts["http_adapters"], http_info = http_scenario(model_dir, adapters, texts, work, args)
        info |= http_info

    tps = {scenario: burst.generated_tokens / burst.wall_s for scenario, burst in bursts.items()}
    ratios = {
        "engine_adapters/engine_base": tps["engine_adapters"] / tps["engine_base"],
        "engine_adapters/peft": tps["engine_adapters"] / tps["peft"],
    }
    if "http_adapters" in tps:
        ratios["http_adapters/engine_adapters"] = tps["http_adapters"] / tps["engine_adapters"]
    with_adapters = bursts["engine_adapters"].outputs
    checks = {
        # The same adapters and greedy decoding: the engine and PEFT should pick the same tokens (PEFT rows that
        # were extrapolated are not compared).
        "rows_equal_engine_vs_peft": f"{same_rows(with_adapters, bursts['peft'].outputs)}"
        f"/{len(bursts['peft'].outputs)}",
        # And the adapters must change the outputs, or (2) might be measuring a no-op.
        "rows_changed_by_adapters": f"{args.requests - same_rows(with_adapters, bursts['engine_base'].outputs)}"
        f"/{args.requests}",
        "peft_ifft2_correct": {
            f"{d_out}x{d_in}": torch_ifft2_ok((d_out, d_in))
            for d_out, d_in in sorted({spectrum.shape for spectrum in adapters[0].modules.values()})
        },
    }
    return {
        "model": name,
        "config": describe_model(model_dir),
        "vocab_note": "byte tokenizer (261 ids, embedding padded to 264), not a real LLM vocabulary",
        "info": info,
        "scenarios": {scenario: burst.summary() for scenario, burst in bursts.items()},
        "ratios": {key: round(value, 3) for key, value in ratios.items()},
        "checks": checks,
    }


def print_table(result: dict) -> None:
    config = result["config"]
    print(
        f"\n== {result['model']}: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, vocab {config['vocab_size']} "
        f"({result['vocab_note']})"
    )
    header = f"{'scenario':34} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'tokens':>7} {'wall s':>7}"
    print(header + "  (ms for TTFT/TPOT)")
    for scenario, row in result["scenarios"].items():
        tpot = "-" if row["tpot_p50_ms"] is None else f"{row['tpot_p50_ms']:.1f}"
        print(
            f"{SCENARIO_LABELS[scenario]:34} {row['tokens_per_s']:8.1f} {row['ttft_p50_ms']:9.0f} "
            f"{row['ttft_p99_ms']:9.0f} {tpot:>9} {row['generated_tokens']:7d} {row['wall_s']:7.2f}"
            + (f"  [{row['note']}]" if row["note"] else "")
        )
    for key, value in result["ratios"].items():
        target = TARGETS.get(key)
        verdict = ""
        if target is not None and result["model"] == LARGE_MODEL:
            verdict = f"  target >= {target}: {'PASS' if value >= target else 'MISS'}"
        print(f"ratio {key} = {value:.3f}{verdict}")
    print(f"checks: {result['checks']}, {result['info']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 requests, 8 new tokens, tiny model only, no HTTP")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--http", choices=("none", "tiny", "all"), default="all", help="models to run (4) on")
    parser.add_argument(
        "--peft-budget-s", type=float, default=240.0, help="time for (3)'s sequential sub-batches before extrapolating"
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    parser.add_argument("--load-wait-s", type=float, default=600.0, help="give up waiting for the load after this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_new_tokens, args.http, args.load_wait_s = 8, 8, "none", 0.0
        args.models = [DEFAULT_MODEL_NAME]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    load_at_start = wait_for_quiet_machine(args.max_load, args.load_wait_s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, load {load_at_start:.2f}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as tmp:
        results = [run_model(name, Path(tmp), args) for name in args.models]
    for result in results:
        print_table(result)
    load_at_end = load_1min()
    print(f"\nload (1 min) at start {load_at_start:.2f}, at end {load_at_end:.2f}; {time.perf_counter() - began:.0f}s")
    report = {
        **report_header("serve_throughput", args, load_at_start, began),
        "adapters": {
            "method": "fourierft",
            "n_frequency": N_FREQUENCY,
            "scaling": SCALING,
            "random_loc_seed": SEED,
            "targets": list(TARGET_SUFFIXES),
        },
        "targets": {"model": LARGE_MODEL, **TARGETS},
        "results": results,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
