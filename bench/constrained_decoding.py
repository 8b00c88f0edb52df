"""Constrained decoding against free decoding: what a grammar per row costs the engine.

32 concurrent greedy requests, 32-token prompts, each generating exactly ``--new-tokens`` tokens
(``ignore_eos`` and ``max_new_tokens``), on the in-process engine; the configurations run alternately
(their order rotating each repeat) in one process, on one engine:

- ``free``: no grammar;
- ``json_shared``: every row with the same JSON schema, so after the warm-up each request is a
  compiled-grammar cache hit (only the matcher's ``deep_copy``);
- ``json_distinct``: every row its own schema (the integers' ``maximum`` differs), never seen before
  by the engine in any run, so every request compiles its grammar on submit;
- ``regex`` (with ``--configs``): every row the same regex, words of 1-8 letters each followed by a space.

The schema is an array of integers 0..maximum with ``minItems`` = new tokens. Each item takes at least
two tokens of the byte tokenizer (a digit and a comma), so the array cannot close within the budget: eos is
never allowed and every row runs to exactly ``--new-tokens`` (checked). The regex needs that many words, for
the same reason. Every constrained output is checked: the JSON text, cut by length, must be a compact prefix of
a conforming array (its items in range); the regex text must fullmatch the pattern's prefix closure.

Besides tokens/s it reports where the engine thread's time went (the prefill and decode forwards,
postprocessing, the sampling batch and the mask within it: instance methods timed by wrappers, nothing under
``server/`` changes), a replay of a recorded constrained batch through ``GrammarMasks.fill``, the raw llguidance
masks and ``consume_token`` outside the engine, and the cost of a compile and of a cache hit. ``--profile``
adds a cProfile of the engine thread's steps during one more ``json_distinct`` burst.

The byte tokenizer has 261 tokens; llguidance walks a token trie for each mask and the mask is unpacked to one
bool per vocabulary entry, so the mask numbers here are a lower bound for a 32k-128k BPE vocabulary.

Usage: ``PYTHONPATH=. .venv/bin/python bench/constrained_decoding.py [--quick] [--models ...] [--configs ...]
[--new-tokens N] [--repeats R] [--profile] [--out PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llguidance
import torch
from transformers.utils import logging as hf_logging

from adapters_store.store import AdapterStore
from bench.common import cpu_model, load_1min, report_header, wait_for_quiet_machine, write_report
from bench.serve_throughput import MODELS, build_model, describe_model, make_prompts
from server.engine.adapters import AdapterRegistry
from server.engine.engine import Engine
from server.engine.grammar import GrammarMasks, llguidance_grammar
from server.engine.model_runner import ModelRunner
from server.engine.sampler import SamplingBatch, sample
from server.engine.types import FinishEvent, GenerationRequest, Grammar, SamplingParams
from server.models.embedded import DEFAULT_MODEL_NAME
from server.settings import ServerSettings

ROWS = 32
PROMPT_TOKENS = 32
WARMUP_NEW_TOKENS = 4
CONFIGS = ("free", "json_shared", "json_distinct", "regex")
LABELS = {
    "free": "(a) no grammar",
    "json_shared": "(b) one JSON schema, cached",
    "json_distinct": "(c) 32 distinct schemas, compiled",
    "regex": "(d) one regex, cached",
}
TARGET = 0.9  # constrained tokens/s over free tokens/s
SHARED_MAXIMUM = 999
# A word of 1-8 letters and a space, as often as ``{count}``; its prefixes are what a cut-off row may produce.
REGEX = "([a-z]{{1,8}} ){{{count}}}"
REGEX_PREFIX = re.compile(r"([a-z]{1,8} )*[a-z]{0,8}")


def array_schema(new_tokens: int, maximum: int) -> str:
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": maximum},
        "minItems": new_tokens,
    }
    return json.dumps(schema)


@dataclass(frozen=True)
class RowSpec:
    """A row's grammar and what its output is checked against."""

    grammar: Grammar | None
    maximum: int = 0


class Workloads:
    """The rows of each configuration; ``json_distinct`` draws maxima never used before on this engine."""

    def __init__(self, new_tokens: int):
        self.new_tokens = new_tokens
        self._next_maximum = SHARED_MAXIMUM - 1

    def rows(self, config: str) -> list[RowSpec]:
        if config == "free":
            return [RowSpec(None)] * ROWS
        if config == "json_shared":
            return [
                RowSpec(Grammar("json_schema", array_schema(self.new_tokens, SHARED_MAXIMUM)), SHARED_MAXIMUM)
            ] * ROWS
        if config == "regex":
            return [RowSpec(Grammar("regex", REGEX.format(count=self.new_tokens)))] * ROWS
        specs = []
        for _ in range(ROWS):
            maximum = self._next_maximum
            if maximum < 10:
                raise RuntimeError("out of distinct schemas: use fewer repeats")
            self._next_maximum -= 1
            specs.append(RowSpec(Grammar("json_schema", array_schema(self.new_tokens, maximum)), maximum))
        return specs


def output_problem(spec: RowSpec, finish: FinishEvent, new_tokens: int) -> str | None:
    """Why ``finish`` is not what its row must produce, or ``None``."""
    if finish.generated_tokens != new_tokens or finish.reason != "length":
        return f"{finish.generated_tokens} tokens ({finish.reason}), expected {new_tokens} (length)"
    grammar = spec.grammar
    if grammar is None:
        return None
    text = finish.text
    if grammar.kind == "regex":
        return None if REGEX_PREFIX.fullmatch(text) else f"{text!r} does not match the regex's prefix closure"
    # A compact array cut anywhere: drop a trailing comma and close it; it must parse, be compact (the
    # grammar allows no whitespace) and hold integers in range. Leading zeros do not parse.
    body = text[:-1] if text.endswith(",") else text
    try:
        items = json.loads(body + "]")
    except json.JSONDecodeError as error:
        return f"{text!r} is not a prefix of a JSON array ({error})"
    if not isinstance(items, list) or json.dumps(items, separators=(",", ":")) != body + "]":
        return f"{text!r} is not a compact JSON array prefix"
    bad = [item for item in items if type(item) is not int or not 0 <= item <= spec.maximum]
    if bad:
        return f"{text!r}: items {bad[:3]} outside integers 0..{spec.maximum}"
    return None


@dataclass
class Burst:
    config: str
    wall_s: float
    submit_s: float
    generated_tokens: int
    compiled: int  # grammar cache misses during the burst
    cache_hits: int
    engine_time: dict[str, float]
    engine_calls: dict[str, int]
    outputs: list[list[int]]
    specs: list[RowSpec]

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s


class EngineTimers:
    """Wall time of the engine thread's main calls, by wrapping instance methods (the class stays as it is).

    ``runner.prefill``, ``runner.decode`` and ``engine._postprocess`` are disjoint; ``_sampling_batch`` runs
    inside ``_postprocess`` and ``GrammarMasks.fill`` inside ``_sampling_batch``.
    """

    def __init__(self, engine: Engine):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._wrap(engine.runner, "prefill", "prefill_forward")
        self._wrap(engine.runner, "decode", "decode_forward")
        self._wrap(engine, "_postprocess", "postprocess")
        self._wrap(engine, "_sampling_batch", "sampling_batch")
        self._wrap(engine._grammar_masks, "fill", "mask_fill")

    def _wrap(self, owner: object, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - began
                self.calls[label] += 1

        setattr(owner, attribute, timed)

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        totals, calls = dict(self.totals), dict(self.calls)
        self.totals.clear()
        self.calls.clear()
        return totals, calls


def make_engine(model_dir: Path, work: Path) -> Engine:
    runner = ModelRunner(model_dir, dtype="float32", device="cpu")
    registry = AdapterRegistry(
        runner.bank, runner.module_shapes, runner.architecture, AdapterStore(work / "store"), base_model="bench"
    )
    return Engine(runner, registry, ServerSettings(max_batch_size=ROWS, max_queue=4 * ROWS), model_dir.name)


def run_burst(
    engine: Engine, timers: EngineTimers, config: str, prompts: list[list[int]], specs: list[RowSpec], new_tokens: int
) -> Burst:
    hits, misses = engine.grammars.hits, engine.grammars.misses
    timers.take()

    async def go() -> tuple[float, list[FinishEvent]]:
        handles = [
            engine.submit(
                GenerationRequest(
                    prompt,
                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, grammar=spec.grammar),
                    request_id=f"{config}-{index}",
                )
            )
            for index, (prompt, spec) in enumerate(zip(prompts, specs, strict=True))
        ]
        submitted = time.perf_counter() - start
        return submitted, list(await asyncio.gather(*(handle.result() for handle in handles)))

    start = time.perf_counter()
    submit_s, finishes = asyncio.run(go())
    wall = time.perf_counter() - start
    totals, calls = timers.take()
    problems = [
        f"row {row}: {problem}"
        for row, (spec, finish) in enumerate(zip(specs, finishes, strict=True))
        if (problem := output_problem(spec, finish, new_tokens)) is not None
    ]
    if problems:
        raise RuntimeError(f"{config} produced wrong outputs:\n" + "\n".join(problems[:5]))
    return Burst(
        config=config,
        wall_s=wall,
        submit_s=submit_s,
        generated_tokens=sum(finish.generated_tokens for finish in finishes),
        compiled=engine.grammars.misses - misses,
        cache_hits=engine.grammars.hits - hits,
        engine_time=totals,
        engine_calls=calls,
        outputs=[[token.token_id for token in finish.tokens] for finish in finishes],
        specs=specs,
    )


def per_step_ms(bursts: list[Burst]) -> dict[str, float]:
    """Median over the bursts of each timed call's mean ms per call, and the share of the burst's wall time."""
    summary: dict[str, float] = {}
    for label in ("prefill_forward", "decode_forward", "postprocess", "sampling_batch", "mask_fill"):
        means = [b.engine_time[label] / b.engine_calls[label] for b in bursts if b.engine_calls.get(label)]
        shares = [b.engine_time.get(label, 0.0) / b.wall_s for b in bursts]
        if means:
            summary[f"{label}_ms"] = round(1000 * statistics.median(means), 3)
        summary[f"{label}_share"] = round(statistics.median(shares), 3)
    summary["steps"] = statistics.median(b.engine_calls.get("postprocess", 0) for b in bursts)
    summary["outside_timed_share"] = round(
        statistics.median(
            1 - sum(b.engine_time.get(k, 0.0) for k in ("prefill_forward", "decode_forward", "postprocess")) / b.wall_s
            for b in bursts
        ),
        3,
    )
    return summary


def step_costs(bursts: list[Burst]) -> tuple[float, float, float]:
    """Median seconds per decode step (one token for each of the rows) of the forwards, of postprocessing and of
    submitting the requests (a burst's totals over its tokens, times the rows)."""

    def median(part: Callable[[Burst], float]) -> float:
        return statistics.median(part(b) * ROWS / b.generated_tokens for b in bursts)

    return (
        median(lambda b: b.engine_time.get("prefill_forward", 0.0) + b.engine_time.get("decode_forward", 0.0)),
        median(lambda b: b.engine_time.get("postprocess", 0.0)),
        median(lambda b: b.submit_s),
    )


def replay_masks(engine: Engine, specs: list[RowSpec], outputs: list[list[int]], new_tokens: int) -> dict:
    """Feed a recorded constrained batch through three identical sets of matchers, outside the engine: one set
    through ``GrammarMasks.fill`` (what the engine calls each step), one through the bare llguidance loop
    into a preallocated bitmask, one through llguidance's batched ``LLExecutor`` call (one GIL release for all
    rows); then ``consume_token`` of every row's recorded token. ms per step (32 rows).
    Each recorded token must be allowed by its row's mask."""
    grammars = [spec.grammar for spec in specs]
    assert all(grammar is not None for grammar in grammars)
    filled = [engine.grammars.matcher(grammar) for grammar in grammars]  # type: ignore[arg-type]
    raw = [engine.grammars.matcher(grammar) for grammar in grammars]  # type: ignore[arg-type]
    batched = [engine.grammars.matcher(grammar) for grammar in grammars]  # type: ignore[arg-type]
    executor = llguidance.LLExecutor()
    vocab = engine.runner.vocab_size
    masks = GrammarMasks(vocab)
    device = engine.runner.device
    bitmask = torch.empty((ROWS, -(-vocab // 32)), dtype=torch.int32)
    base, row_bytes = bitmask.data_ptr(), bitmask.shape[1] * bitmask.element_size()
    fill_s, raw_s, batched_s, consume_s = [], [], [], []
    for step in range(new_tokens):
        began = time.perf_counter()
        allowed = masks.fill(filled, device)  # type: ignore[arg-type]
        fill_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        for row, matcher in enumerate(raw):
            matcher.unsafe_compute_mask_ptr(base + row * row_bytes, row_bytes)
        raw_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        executor.unsafe_compute_mask_ptr([(matcher, row) for row, matcher in enumerate(batched)], base, row_bytes, ROWS)
        batched_s.append(time.perf_counter() - began)
        tokens = [output[step] for output in outputs]
        assert allowed is not None and bool(allowed.allowed[torch.arange(ROWS), torch.tensor(tokens)].all()), step
        began = time.perf_counter()
        for matcher, token in zip(filled, tokens, strict=True):
            if not matcher.consume_token(token):
                raise RuntimeError(f"replay: token {token} rejected at step {step}: {matcher.get_error()}")
        consume_s.append(time.perf_counter() - began)
        for matcher, token in zip(raw + batched, tokens + tokens, strict=True):
            matcher.consume_token(token)

    def ms(values: list[float]) -> dict[str, float]:
        return {"median": round(1000 * statistics.median(values), 3), "mean": round(1000 * statistics.fmean(values), 3)}

    return {
        "fill_ms": ms(fill_s),
        "llguidance_masks_ms": ms(raw_s),
        "llguidance_batched_masks_ms": ms(batched_s),
        "consume_ms": ms(consume_s),
    }


def sampler_mask_cost(engine: Engine, mask_of: list[RowSpec], repeats: int = 50) -> dict[str, float]:
    """``sample`` of random ``[32, vocab]`` logits with and without a grammar mask (greedy), ms per call."""
    vocab = engine.runner.vocab_size
    device = engine.runner.device
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(0))
    matchers = [engine.grammars.matcher(spec.grammar) for spec in mask_of]  # type: ignore[arg-type]
    mask = GrammarMasks(vocab).fill(matchers, device)  # type: ignore[arg-type]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True)] * ROWS
    timings = {}
    for name, grammar_mask in (("without_mask", None), ("with_mask", mask)):
        batch = SamplingBatch.build(params, [1] * ROWS, None, device, grammar=grammar_mask)
        sample(logits, batch)
        began = time.perf_counter()
        for _ in range(repeats):
            sample(logits, batch)
        timings[f"sample_{name}_ms"] = round(1000 * (time.perf_counter() - began) / repeats, 3)
    return timings


def grammar_costs(engine: Engine, workloads: Workloads) -> dict[str, float]:
    """ms per ``GrammarCompiler.matcher`` call: a cache hit (deep copy) and a miss (compile)."""
    shared = workloads.rows("json_shared")[0].grammar
    assert shared is not None
    engine.grammars.matcher(shared)  # compiled already when json_shared ran; otherwise now, untimed
    began = time.perf_counter()
    for _ in range(ROWS):
        engine.grammars.matcher(shared)
    hit = (time.perf_counter() - began) / ROWS
    fresh = [spec.grammar for spec in workloads.rows("json_distinct")]
    began = time.perf_counter()
    for grammar in fresh:
        engine.grammars.matcher(grammar)  # type: ignore[arg-type]
    miss = (time.perf_counter() - began) / ROWS
    return {"cache_hit_ms": round(1000 * hit, 3), "compile_ms": round(1000 * miss, 3)}


def profile_burst(
    engine: Engine, timers: EngineTimers, prompts: list[list[int]], specs: list[RowSpec], new_tokens: int, top: int
) -> dict:
    """cProfile of the engine thread's steps during one burst (``_step`` wrapped on the instance)."""
    profiler = cProfile.Profile()
    original: Callable[[], None] = engine._step

    def profiled() -> None:
        profiler.enable()
        try:
            original()
        finally:
            profiler.disable()

    engine._step = profiled  # type: ignore[method-assign]
    try:
        run_burst(engine, timers, "profile", prompts, specs, new_tokens)
    finally:
        engine._step = original  # type: ignore[method-assign]
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    print(stream.getvalue())
    entries = stats.stats  # type: ignore[attr-defined]

    def row(key: tuple[str, int, str]) -> dict:
        filename, line, function = key
        _, calls, tottime, cumtime, _ = entries[key]
        return {
            "function": f"{Path(filename).name}:{line}({function})",
            "calls": calls,
            "tottime_s": round(tottime, 4),
            "cumtime_s": round(cumtime, 4),
        }

    by_tottime = sorted(entries, key=lambda key: entries[key][2], reverse=True)
    # The grammar's own calls: GrammarMasks.fill (the mask; cumulative) and the matchers' methods the engine
    # calls while appending tokens (consume_token, is_stopped).
    grammar = [key for key in entries if key[0].endswith("grammar.py") or "LLMatcher" in key[2]]
    grammar_rows = [row(key) for key in sorted(grammar, key=lambda key: entries[key][3], reverse=True)]
    for item in grammar_rows:
        print(f"    grammar: {item}")
    return {
        "total_s": round(stats.total_tt, 3),  # type: ignore[attr-defined]
        "steps": sum(entries[key][1] for key in entries if key[0].endswith("engine.py") and key[2] == "_step"),
        "top": [row(key) for key in by_tottime[:top]],
        "grammar": grammar_rows,
    }


def run_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    model_dir = build_model(name, work)
    engine = make_engine(model_dir, work / f"engine-{name}")
    texts = make_prompts(ROWS, PROMPT_TOKENS)
    prompts = [engine.tokenizer.encode(text) for text in texts]
    assert all(len(prompt) == PROMPT_TOKENS for prompt in prompts), "prompts must have equal token counts"
    print(f"model {name}: {describe_model(model_dir)}", flush=True)
    workloads = Workloads(args.new_tokens)
    timers = EngineTimers(engine)
    bursts: dict[str, list[Burst]] = {config: [] for config in args.configs}
    engine.start()
    try:
        # Warm-up: the same prompts and grammars (json_shared compiles its one schema here), a few tokens.
        for config in args.configs:
            run_burst(engine, timers, config, prompts, workloads.rows(config), WARMUP_NEW_TOKENS)
        for repeat in range(args.repeats):
            shift = repeat % len(args.configs)
            for config in args.configs[shift:] + args.configs[:shift]:
                burst = run_burst(engine, timers, config, prompts, workloads.rows(config), args.new_tokens)
                bursts[config].append(burst)
                print(
                    f"  repeat {repeat + 1} {LABELS[config]}: {burst.tokens_per_s:.1f} tok/s "
                    f"(submit {1000 * burst.submit_s:.1f} ms, {burst.compiled} compiled, {burst.cache_hits} hits)",
                    flush=True,
                )
        constrained = [config for config in args.configs if config != "free"]
        replays = {}
        for config in constrained:
            last = bursts[config][-1]
            replays[config] = replay_masks(engine, last.specs, last.outputs, args.new_tokens)
        sampler = sampler_mask_cost(engine, workloads.rows("json_shared")) if constrained else {}
        costs = grammar_costs(engine, workloads) if constrained else {}
        profile = None
        if args.profile and constrained:
            config = "json_distinct" if "json_distinct" in constrained else constrained[0]
            print(f"  cProfile of the engine thread, one {LABELS[config]} burst (top {args.profile_top} by tottime):")
            profile = {
                "config": config,
                **profile_burst(engine, timers, prompts, workloads.rows(config), args.new_tokens, args.profile_top),
            }
    finally:
        engine.stop()

    rates = {config: statistics.median(b.tokens_per_s for b in runs) for config, runs in bursts.items()}
    ratios, paired, from_steps = {}, {}, {}
    if "free" in bursts:
        free_step = step_costs(bursts["free"])
        for config in bursts:
            if config != "free":
                ratios[f"{config}/free"] = round(rates[config] / rates["free"], 3)
                paired[f"{config}/free"] = [
                    round(c.tokens_per_s / f.tokens_per_s, 3)
                    for c, f in zip(bursts[config], bursts["free"], strict=True)
                ]
                # The free step plus only what the grammar adds (postprocessing, submit-time compiles per
                # step): less exposed to the forwards' noise on a shared machine than the tok/s ratio.
                forward, post, submit = free_step
                _, post_c, submit_c = step_costs(bursts[config])
                from_steps[f"{config}/free"] = round(
                    (forward + post) / (forward + post_c + max(0.0, submit_c - submit)), 3
                )
    return {
        "model": name,
        "config": describe_model(model_dir),
        "vocab_note": "byte tokenizer (261 ids, embedding padded to 264), not a real LLM vocabulary",
        "scenarios": {
            config: {
                "tokens_per_s": round(rates[config], 1),
                "runs_tokens_per_s": [round(b.tokens_per_s, 1) for b in runs],
                "wall_s": round(statistics.median(b.wall_s for b in runs), 3),
                "submit_ms": round(1000 * statistics.median(b.submit_s for b in runs), 2),
                "compiled_per_run": [b.compiled for b in runs],
                "cache_hits_per_run": [b.cache_hits for b in runs],
                "engine_thread": per_step_ms(runs),
            }
            for config, runs in bursts.items()
        },
        "ratios": ratios,
        "ratios_per_repeat": paired,
        "ratios_from_step_costs": from_steps,
        "mask_replay": replays,
        "sampler": sampler,
        "grammar_costs": costs,
        "profile": profile,
    }


def print_table(result: dict) -> None:
    config = result["config"]
    print(
        f"\n== {result['model']}: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']} ({result['vocab_note']})"
    )
    header = f"{'scenario':36} {'tok/s':>8} {'decode ms':>10} {'post ms':>8} {'mask ms':>8} {'submit ms':>10}  runs"
    print(header + "  (ms per step, medians)")
    for name, row in result["scenarios"].items():
        steps = row["engine_thread"]
        print(
            f"{LABELS[name]:36} {row['tokens_per_s']:8.1f} {steps.get('decode_forward_ms', 0):10.2f} "
            f"{steps.get('postprocess_ms', 0):8.2f} {steps.get('mask_fill_ms', 0):8.3f} {row['submit_ms']:10.1f}  "
            f"{row['runs_tokens_per_s']}"
        )
    for name, value in result["ratios"].items():
        verdict = "PASS" if value >= TARGET else "MISS"
        runs = result["ratios_per_repeat"][name]
        steps = result["ratios_from_step_costs"][name]
        print(f"ratio {name} = {value:.3f} (per repeat {runs}; from step costs {steps})  target >= {TARGET}: {verdict}")
    for name, replay in result["mask_replay"].items():
        print(f"mask replay {name} (ms per step, {ROWS} rows): {replay}")
    if result["sampler"]:
        print(f"sampler: {result['sampler']}; grammar matcher(): {result['grammar_costs']}")


class SyntheticTokenizer:
    """A vocabulary of ``size`` tokens for llguidance: the 256 bytes, then deterministic pseudo-words and JSON
    fragments (``"``, ``":``, digits, ...). No real tokenizer of that size is available offline; what the mask
    costs depends on the vocabulary's size and its trie, which this approximates."""

    def __init__(self, size: int):
        rng = random.Random(size)
        pieces = [b'"', b'":', b'",', b"{", b"}", b"[", b"]", b",", b" ", b"\n"]
        alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 _-"
        words = {bytes([byte]) for byte in range(256)}
        tokens = [bytes([byte]) for byte in range(256)]
        while len(tokens) < size - 1:
            word = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))
            word = rng.choice(pieces) + word if rng.random() < 0.2 else word
            if word not in words:
                words.add(word)
                tokens.append(word)
        tokens.append(b"<|eos|>")
        self.tokens = tokens
        self.eos_token_id = len(tokens) - 1
        self.bos_token_id = None
        self.special_token_ids = [self.eos_token_id]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def mask_cost_at_vocab(size: int, new_tokens: int, steps: int = 40) -> dict[str, float]:
    """``GrammarMasks.fill`` for 32 JSON-array rows over a synthetic vocabulary of ``size``: ms per step."""
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(SyntheticTokenizer(size)))
    grammar = llguidance_grammar(Grammar("json_schema", array_schema(new_tokens, SHARED_MAXIMUM)))
    began = time.perf_counter()
    compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    compile_ms = 1000 * (time.perf_counter() - began)
    matchers = [compiled.deep_copy() for _ in range(ROWS)]
    masks = GrammarMasks(size)
    fill_ms, consume_ms = [], []
    for step in range(steps):
        began = time.perf_counter()
        masks.fill(matchers, torch.device("cpu"))
        fill_ms.append(1000 * (time.perf_counter() - began))
        # "[", then two-digit numbers without a leading zero: "[12,45,78,..."
        token = ord("[") if step == 0 else ord(",") if step % 3 == 0 else ord(str(1 + step % 9))
        began = time.perf_counter()
        for matcher in matchers:
            assert matcher.consume_token(token), matcher.get_error()
        consume_ms.append(1000 * (time.perf_counter() - began))
    return {
        "vocab": size,
        "compile_ms": round(compile_ms, 2),
        "fill_ms_per_step": round(statistics.median(fill_ms), 3),
        "consume_ms_per_step": round(statistics.median(consume_ms), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 48 new tokens, 3 repeats: a smoke test")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per configuration (median)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS[:3]))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine thread in one more burst")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    parser.add_argument("--load-wait-s", type=float, default=600.0, help="give up waiting for the load after this")
    parser.add_argument(
        "--vocab-sizes", type=int, nargs="*", default=[32_000, 128_256], help="synthetic vocabularies for mask cost"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "constrained_decoding.json")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.load_wait_s, args.models = 48, 3, 0.0, [DEFAULT_MODEL_NAME]
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    load_at_start = wait_for_quiet_machine(args.max_load, args.load_wait_s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, load {load_at_start:.2f}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="constrained-decoding-") as tmp:
        results = [run_model(name, Path(tmp), args) for name in args.models]
    for result in results:
        print_table(result)
    vocab_costs = [mask_cost_at_vocab(size, args.new_tokens) for size in args.vocab_sizes]
    for cost in vocab_costs:
        print(f"mask cost, 32 JSON rows, synthetic vocabulary of {cost['vocab']}: {cost}")
    load_at_end = load_1min()
    print(f"\nload (1 min) at start {load_at_start:.2f}, at end {load_at_end:.2f}; {time.perf_counter() - began:.0f}s")
    report = {
        **report_header("constrained_decoding", args, load_at_start, began),
        "rows": ROWS,
        "prompt_tokens": PROMPT_TOKENS,
        "schemas": {
            "json_shared": json.loads(array_schema(args.new_tokens, SHARED_MAXIMUM)),
            "json_distinct": f"the same with maximum {SHARED_MAXIMUM - 1}, {SHARED_MAXIMUM - 2}, ... (never reused)",
            "regex": REGEX.format(count=args.new_tokens),
        },
        "target": {"constrained/free": TARGET},
        "results": results,
        "mask_cost_by_vocab": vocab_costs,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
