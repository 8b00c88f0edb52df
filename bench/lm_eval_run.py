"""A short lm-eval run: lm-evaluation-harness against the real server, side by side with its in-process ``hf`` backend.

The embedded default model (``spectra-tiny-llama``, random weights: the metrics are those of a random model,
what matters is that both sides report the same ones) and one PEFT FourierFT adapter ("alpha": q_proj and
v_proj, n_frequency 1000, scaling 150, PEFT's default ``random_loc_seed`` 777, coefficients drawn from
``--seed``). Three tasks written by ``bench/lm_eval_tasks.py`` from ``--seed`` (local JSONL, nothing
downloaded): multiple choice (``--mc`` docs, 2-5 choices), ``loglikelihood_rolling`` (``--rolling`` texts of
300-1,200 bytes, several windows each) and greedy ``generate_until`` (``--gen`` docs).

In one process, ``lm_eval.simple_evaluate`` on the same tasks with

- ``hf``: lm-eval's in-process backend on the model directory, batch sizes ``--batch-sizes``; for the adapter,
  PEFT's ``PeftModel`` on the unresized model, as ``tests/test_lm_eval.py`` loads it (lm-eval's own ``peft=``
  first resizes the embeddings to the tokenizer and so scores over 261 logits instead of 264);
- ``local-completions``: the real ``spectra serve`` as a subprocess, token-id prompts (``tokenized_requests``),
  ``add_bos_token=True`` (``docs/evaluation.md``), ``num_concurrent`` ``--num-concurrent``, the same batch sizes.

The hf runs at batch size 1 are the oracle: every other run reports its max |delta loglik| per sample
(multiple-choice choices and rolling texts), whether its is_greedy flags and its generations are the same.
Rolling windows: ``local-completions`` cuts windows of ``max_length - 2`` tokens, ``hf`` of ``max_length``, so
the server's harness gets ``max_length = --window + 2`` and ``hf`` ``--window``: both score the same windows.
Wall time is ``simple_evaluate`` alone, with the LM object built before (tokenizer, weights) and the datasets
prepared by a first ``get_task_dict``; the fastest of ``--repeats`` round-robin runs. requests/s counts lm-eval's
requests (one per choice, rolling text and generation); POSTs are what the server counted. Both sides run
``--torch-threads`` (1: the server's own default on 2 cores): in a trial with 2 threads and other processes busy
on the machine, the in-process hf backend ran up to 10x slower (its second thread waiting for a core).
Exits 1 if a per-sample |delta loglik| exceeds 1e-3, the tolerance of ``tests/test_lm_eval.py``.

Usage: ``PYTHONPATH=. .venv/bin/python bench/lm_eval_run.py [--out PATH]``
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager, get_task_dict
from lm_eval.utils import get_rolling_token_windows
from peft import FourierFTConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from bench.common import cpu_model, load_1min, report_header, running_server, wait_for_quiet_machine, write_report
from bench.lm_eval_tasks import GEN_TASK, MC_TASK, REPRODUCIBLE, ROLLING_TASK, TASKS, generated_docs, write_tasks
from server.models.embedded import ensure_default_model

ADAPTER_ID = "alpha"
ADAPTER_FIELDS = {"target_modules": ["q_proj", "v_proj"], "n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}
UNTIL = ["\n", "."]
METRICS = {MC_TASK: "acc", ROLLING_TASK: "word_perplexity", GEN_TASK: "exact_match"}
HTTP_COUNTER = re.compile(r"^spectra_http_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)


def save_peft_adapter(model_dir: Path, out_dir: Path, seed: int) -> Path:
    """As ``tests/test_peft_parity.py`` makes one: PEFT draws the initial spectrum from the global RNG."""
    torch.manual_seed(seed)
    config = FourierFTConfig(task_type="CAUSAL_LM", init_weights=False, **ADAPTER_FIELDS)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    get_peft_model(base, config).save_pretrained(out_dir)
    return out_dir


def hf_lm(model_dir: Path, adapter_dir: Path | None, batch_size: int, window: int) -> HFLM:
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size, max_length=window)
    if adapter_dir is not None:  # not ``peft=``: see the module docstring
        lm._model = PeftModel.from_pretrained(lm._model, str(adapter_dir)).eval()
    return lm


def completions_lm(base_url: str, model: str, model_dir: Path, batch_size: int, args: argparse.Namespace) -> Any:
    return LocalCompletionsAPI(
        base_url=f"{base_url}/v1/completions",
        model=model,
        tokenizer=str(model_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        add_bos_token=True,
        batch_size=batch_size,
        num_concurrent=args.num_concurrent,
        max_length=args.window + 2,
        max_retries=1,
        timeout=120,
    )


def completions_posts(base_url: str) -> int:
    """``POST /v1/completions`` answered so far, from the server's own counter."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for match in HTTP_COUNTER.finditer(text):
        if 'route="/v1/completions"' in match["labels"] and 'method="POST"' in match["labels"]:
            total += float(match["value"])
    return int(total)


def evaluate(lm: Any, manager: TaskManager) -> tuple[dict, float]:
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=manager,
        **REPRODUCIBLE,
    )
    wall = time.perf_counter() - started
    assert results is not None
    return results, wall


def samples_of(results: dict) -> dict[str, list[dict]]:
    return {task: sorted(items, key=lambda s: s["doc_id"]) for task, items in results["samples"].items()}


def choice_logliks(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    return [[(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]] for sample in samples]


def rolling_logliks(samples: list[dict]) -> list[float]:
    return [float(sample["filtered_resps"][0]) for sample in samples]


def generations(samples: list[dict]) -> list[str]:
    return [sample["filtered_resps"][0] for sample in samples]


def compare(got: dict, oracle: dict) -> dict:
    """Two rows, per sample: max |delta loglik|, is_greedy flags, generations; and the metrics' differences."""
    mc_got, mc_oracle = choice_logliks(got["_samples"][MC_TASK]), choice_logliks(oracle["_samples"][MC_TASK])
    pairs = [(g, e) for gd, ed in zip(mc_got, mc_oracle, strict=True) for g, e in zip(gd, ed, strict=True)]
    rolling = zip(
        rolling_logliks(got["_samples"][ROLLING_TASK]), rolling_logliks(oracle["_samples"][ROLLING_TASK]), strict=True
    )
    gens = list(zip(generations(got["_samples"][GEN_TASK]), generations(oracle["_samples"][GEN_TASK]), strict=True))
    metrics, expected = got["metrics"], oracle["metrics"]
    return {
        "max_abs_dloglik_mc": max(abs(g[0] - e[0]) for g, e in pairs),
        "max_abs_dloglik_rolling": max(abs(g - e) for g, e in rolling),
        "is_greedy_equal": f"{sum(g[1] == e[1] for g, e in pairs)}/{len(pairs)}",
        "generations_equal": f"{sum(g == e for g, e in gens)}/{len(gens)}",
        "acc_diff": metrics[MC_TASK] - expected[MC_TASK],
        "word_perplexity_rel_diff": metrics[ROLLING_TASK] / expected[ROLLING_TASK] - 1,
        "exact_match_diff": metrics[GEN_TASK] - expected[GEN_TASK],
    }


def run_row(backend: str, model: str, batch_size: int, results: dict, walls: list[float], posts: int | None) -> dict:
    """One configuration: its first run's results, the fastest of its ``walls``."""
    samples = samples_of(results)
    requests = sum(len(sample["arguments"]) for items in samples.values() for sample in items)
    metrics = {task: float(results["results"][task][f"{metric},none"]) for task, metric in METRICS.items()}
    wall = min(walls)
    return {
        "backend": backend,
        "model": model,
        "batch_size": batch_size,
        "wall_s": round(wall, 2),
        "walls_s": [round(value, 2) for value in walls],
        "lm_eval_requests": requests,
        "requests_per_s": round(requests / wall, 1),
        "http_posts": posts,
        "metrics": metrics,
        "greedy_choices": sum(greedy for choices in choice_logliks(samples[MC_TASK]) for _, greedy in choices),
        "generations": generations(samples[GEN_TASK]),
        "_samples": samples,
    }


Config = tuple[str, str, int, Any, str | None]  # backend, model, batch size, LM, server URL


def run_configs(configs: list[Config], manager: TaskManager, args: argparse.Namespace) -> list[dict]:
    """``--repeats`` rounds over ``configs``, round-robin so that the machine's load spreads over all of them.
    With a server URL, each run's ``POST /v1/completions`` count from the server's metrics."""
    first: dict[int, dict] = {}
    walls: dict[int, list[float]] = {index: [] for index in range(len(configs))}
    posts: dict[int, int | None] = {}
    for repeat in range(args.repeats):
        for index, (backend, model, batch_size, lm, server_url) in enumerate(configs):
            before = completions_posts(server_url) if server_url else 0
            results, wall = evaluate(lm, manager)
            posts[index] = completions_posts(server_url) - before if server_url else None
            walls[index].append(wall)
            first.setdefault(index, results)
            print(
                f"  [{repeat + 1}/{args.repeats}] {backend:17} {model:5} batch {batch_size}: {wall:6.2f} s", flush=True
            )
    return [
        run_row(backend, model, batch_size, first[index], walls[index], posts[index])
        for index, (backend, model, batch_size, _, _) in enumerate(configs)
    ]


def rolling_windows(model_dir: Path, texts: list[str], window: int) -> int:
    """How many windows both backends score (the tokenizer adds <|bos|>, as ``add_bos_token=True`` does)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = tokenizer.bos_token_id
    return sum(
        len(list(get_rolling_token_windows(tokenizer.encode(text), prefix, window, context_len=1))) for text in texts
    )


def warm_up_server(base_url: str, models: list[str]) -> None:
    for model in models:
        body = {"model": model, "prompt": [[1, 65, 66, 67]] * 2, "max_tokens": 1, "echo": True, "logprobs": 1}
        response = httpx.post(f"{base_url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
        response.raise_for_status()


def print_table(rows: list[dict]) -> None:
    """Metrics as lm-eval reports them; the deltas are against the hf batch-1 run of the same model."""
    header = (
        f"{'backend':17} {'model':5} {'batch':>5} {'wall s':>7} {'req/s':>6} {'POSTs':>5} {'acc':>6} "
        f"{'word_ppl':>10} {'ppl rel d':>9} {'em':>4} {'max|dll| mc':>11} {'rolling':>8} {'greedy':>8} {'gen =':>5}"
    )
    print("\n" + header)
    for row in rows:
        vs, metrics = row["vs_hf_batch1"], row["metrics"]
        posts = "-" if row["http_posts"] is None else str(row["http_posts"])
        equal, total = vs["is_greedy_equal"].split("/")
        greedy = f"{row['greedy_choices']}" + ("" if equal == total else "!")
        print(
            f"{row['backend']:17} {row['model']:5} {row['batch_size']:5d} {row['wall_s']:7.2f} "
            f"{row['requests_per_s']:6.1f} {posts:>5} {metrics[MC_TASK]:6.3f} {metrics[ROLLING_TASK]:10.4e} "
            f"{vs['word_perplexity_rel_diff']:9.1e} {metrics[GEN_TASK]:4.2f} "
            f"{vs['max_abs_dloglik_mc']:11.2e} {vs['max_abs_dloglik_rolling']:8.2e} {greedy:>8} "
            f"{vs['generations_equal']:>5}"
        )
    print("greedy: choices flagged is_greedy (! = flags differ from hf's); gen =: generations equal to hf's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="docs and adapter coefficients")
    parser.add_argument("--mc", type=int, default=40, help="multiple-choice docs")
    parser.add_argument("--rolling", type=int, default=4, help="loglikelihood_rolling docs")
    parser.add_argument("--gen", type=int, default=10, help="generate_until docs")
    parser.add_argument("--max-gen-toks", type=int, default=16)
    parser.add_argument("--window", type=int, default=256, help="rolling window in tokens (see the docstring)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-concurrent", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is reported")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of the hf backend and the server (its auto here)"
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    parser.add_argument("--load-wait-s", type=float, default=60.0, help="give up waiting for the load after this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_eval_run.json")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    torch.set_num_threads(args.torch_threads)
    load_at_start = wait_for_quiet_machine(args.max_load, args.load_wait_s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, load {load_at_start:.2f}")
    began = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-run-") as tmp:
        work = Path(tmp)
        model_dir = ensure_default_model(work / "data")
        adapter_dir = save_peft_adapter(model_dir, work / "peft-alpha", args.seed)
        mc_docs, rolling_docs, gen_docs = generated_docs(args.seed, args.mc, args.rolling, args.gen)
        manager = write_tasks(
            work / "tasks", mc_docs, rolling_docs, gen_docs, until=UNTIL, max_gen_toks=args.max_gen_toks
        )
        setup = time.perf_counter()
        get_task_dict(list(TASKS), manager)  # builds the datasets' cache once, outside every timed run
        task_setup_s = time.perf_counter() - setup
        windows = rolling_windows(model_dir, [doc["text"] for doc in rolling_docs], args.window)
        tasks_info = {
            "mc_docs": len(mc_docs),
            "mc_choices": sum(len(doc["choices"]) for doc in mc_docs),
            "rolling_docs": len(rolling_docs),
            "rolling_bytes": sum(len(doc["text"]) for doc in rolling_docs),
            "rolling_windows": windows,
            "gen_docs": len(gen_docs),
            "until": UNTIL,
            "max_gen_toks": args.max_gen_toks,
            "task_setup_s": round(task_setup_s, 2),
        }
        print(f"tasks: {tasks_info}", flush=True)

        print("hf (in-process):", flush=True)
        configs: list[Config] = [
            (
                "hf",
                adapter or "base",
                batch_size,
                hf_lm(model_dir, adapter_dir if adapter else None, batch_size, args.window),
                None,
            )
            for adapter in (None, ADAPTER_ID)
            for batch_size in args.batch_sizes
        ]
        rows += run_configs(configs, manager, args)
        del configs

        serve_args = ["--model", str(model_dir), "--adapter", f"{ADAPTER_ID}={adapter_dir}"]
        serve_args += ["--torch-threads", str(args.torch_threads)]
        print("local-completions (spectra serve):", flush=True)
        with running_server(work, *serve_args) as server:  # stopped on the way out, errors included
            model_name = httpx.get(f"{server.base_url}/info", timeout=10).json()["model_id"]
            warm_up_server(server.base_url, [model_name, ADAPTER_ID])
            configs = [
                (
                    "local-completions",
                    adapter or "base",
                    batch_size,
                    completions_lm(server.base_url, adapter or model_name, model_dir, batch_size, args),
                    server.base_url,
                )
                for adapter in (None, ADAPTER_ID)
                for batch_size in args.batch_sizes
            ]
            rows += run_configs(configs, manager, args)

    oracles = {row["model"]: row for row in rows if row["backend"] == "hf" and row["batch_size"] == 1}
    for row in rows:
        row["vs_hf_batch1"] = compare(row, oracles[row["model"]])
    # The comparison can fail: the adapter moves likelihoods and generations well past the deltas above.
    adapter_effect = compare(oracles[ADAPTER_ID], oracles["base"])
    print_table(rows)
    print(f"\nhf adapter vs hf base (what a server ignoring the adapter would show): {adapter_effect}")
    hf_walls = {(row["model"], row["batch_size"]): row["wall_s"] for row in rows if row["backend"] == "hf"}
    ratios = {
        f"{row['model']}/batch{row['batch_size']}": round(row["wall_s"] / hf_walls[row["model"], row["batch_size"]], 2)
        for row in rows
        if row["backend"] == "local-completions"
    }
    print(f"wall local-completions / hf (same model, batch size): {ratios}")
    load_at_end = load_1min()
    print(f"load (1 min) at start {load_at_start:.2f}, at end {load_at_end:.2f}; {time.perf_counter() - began:.0f}s")
    report = {
        **report_header("lm_eval_run", args, load_at_start, began),
        "lm_eval": lm_eval.__version__,
        "adapter": {"id": ADAPTER_ID, "method": "fourierft", **ADAPTER_FIELDS, "coefficient_seed": args.seed},
        "tasks": tasks_info,
        "runs": [{key: value for key, value in row.items() if key != "_samples"} for row in rows],
        "adapter_vs_base_hf": adapter_effect,
        "wall_ratio_server_over_hf": ratios,
        "note": "2 shared cores, other engineers' tests running: wall times are noisy; deltas are not",
    }
    write_report(report, args.out)
    worst = max(
        max(row["vs_hf_batch1"]["max_abs_dloglik_mc"], row["vs_hf_batch1"]["max_abs_dloglik_rolling"]) for row in rows
    )
    if not math.isfinite(worst) or worst > 1e-3:
        raise SystemExit(f"max |delta loglik| {worst:.2e} > 1e-3 against hf")


if __name__ == "__main__":
    main()
