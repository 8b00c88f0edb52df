"""Tiny lm-evaluation-harness tasks on local JSONL files, for ``tests/test_lm_eval.py`` and ``bench/lm_eval_run.py``.

Three tasks, one per request type the harness sends: multiple choice (``loglikelihood``),
``loglikelihood_rolling`` (perplexity) and ``generate_until``. They are YAML files in one directory,
each on a JSONL file next to it (``dataset_path: json``), indexed by a ``TaskManager`` with that
directory as its only ``include_path``: nothing is downloaded and lm-eval's own tasks are not indexed.
``target_delimiter`` is "" so that each choice (and each generation target) is scored exactly as written.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import yaml

# The harness and ``datasets`` read these at import: nothing may be downloaded, ever.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lm_eval.tasks import TaskManager

MC_TASK, ROLLING_TASK, GEN_TASK = "spectra_mc", "spectra_rolling", "spectra_gen"
TASKS = (MC_TASK, ROLLING_TASK, GEN_TASK)


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return path


def _dataset(directory: Path, name: str, docs: list[dict]) -> dict[str, Any]:
    data = _write_jsonl(directory / f"{name}.jsonl", docs)
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "hf-datasets-cache")},
        "test_split": "test",
    }


def write_tasks(
    directory: Path,
    mc_docs: list[dict],
    rolling_docs: list[dict],
    gen_docs: list[dict],
    *,
    until: list[str],
    max_gen_toks: int,
) -> TaskManager:
    """The three tasks as YAML (+ JSONL) in ``directory``, and a ``TaskManager`` that knows only them.

    Docs: multiple choice ``{"question", "choices", "answer"}``, rolling ``{"text"}``, generation
    ``{"prompt", "target"}`` (greedy, stopped by ``until`` or after ``max_gen_toks`` tokens).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tasks = {
        MC_TASK: {
            **_dataset(directory, MC_TASK, mc_docs),
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        ROLLING_TASK: {
            **_dataset(directory, ROLLING_TASK, rolling_docs),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}
            ],
        },
        GEN_TASK: {
            **_dataset(directory, GEN_TASK, gen_docs),
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for name, config in tasks.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
    return TaskManager(include_path=str(directory), include_defaults=False)


# -- generated docs (the benchmark's larger tasks) ----------------------------------------------------------------

# fmt: off
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
]
# fmt: on
LETTERS = [chr(code) for code in range(ord("A"), ord("Z") + 1)]
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Norway": "Oslo",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
}
# fmt: off
WORDS = [
    "the", "a", "model", "server", "adapter", "spectrum", "token", "batch", "request", "stream", "weight",
    "layer", "frequency", "harness", "task", "sample", "score", "cache", "queue", "prompt", "answer", "fast",
    "small", "quiet", "bright", "serves", "reads", "writes", "scores", "returns", "many", "every", "each",
    "one", "over", "under", "with", "from", "into", "after", "before", "while",
]
# fmt: on


def _choices(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def _mc_doc(rng: random.Random, kind: int) -> dict:
    if kind == 0:  # arithmetic
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        wrong = rng.sample([d for d in range(-9, 10) if d], rng.randint(1, 3))
        choices, answer = _choices(rng, f" {a + b}", [f" {a + b + d}" for d in wrong])
        return {"question": f"{a} + {b} =", "choices": choices, "answer": answer}
    if kind == 1:  # counting in words
        start = rng.randint(0, len(NUMBER_WORDS) - 4)
        right = NUMBER_WORDS[start + 3]
        wrong = rng.sample([w for w in NUMBER_WORDS if w != right], rng.randint(1, 4))
        choices, answer = _choices(rng, f" {right}", [f" {w}" for w in wrong])
        return {"question": " ".join(NUMBER_WORDS[start : start + 3]), "choices": choices, "answer": answer}
    if kind == 2:  # the alphabet; a trailing space in the context, which lm-eval moves to the continuation
        start = rng.randint(0, len(LETTERS) - 5)
        right = LETTERS[start + 4]
        wrong = rng.sample([letter for letter in LETTERS if letter != right], rng.randint(1, 3))
        choices, answer = _choices(rng, right, wrong)
        return {"question": " ".join(LETTERS[start : start + 4]) + " ", "choices": choices, "answer": answer}
    country = rng.choice(sorted(CAPITALS))
    wrong = rng.sample([city for name, city in sorted(CAPITALS.items()) if name != country], rng.randint(1, 3))
    choices, answer = _choices(rng, f" {CAPITALS[country]}", [f" {city}" for city in wrong])
    return {"question": f"Q: capital of {country}?\nA:", "choices": choices, "answer": answer}


def _sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(5, 14))
    return " ".join(words).capitalize() + "."


def generated_docs(seed: int, mc: int = 40, rolling: int = 4, gen: int = 10) -> tuple[list[dict], ...]:
    """Deterministic docs for the three tasks from ``seed``: ``(mc_docs, rolling_docs, gen_docs)``.

    Multiple choice: 2-5 choices from four templates (sums, counting words, the alphabet with a trailing
    space, capitals). Rolling: texts of about ``300 * (i + 1)`` characters, several harness windows each at
    a window of 256 tokens (one token per byte with the embedded model's tokenizer). Generation: prompts
    whose target is the next item of a sequence, stopped at "\\n" or ".".
    """
    rng = random.Random(seed)
    mc_docs = [_mc_doc(rng, index % 4) for index in range(mc)]
    rolling_docs = []
    for index in range(rolling):
        sentences: list[str] = []
        while sum(len(s) + 1 for s in sentences) < 300 * (index + 1):
            sentences.append(_sentence(rng))
        rolling_docs.append({"text": " ".join(sentences)})
    gen_docs = []
    for index in range(gen):
        if index % 2 == 0:
            start = rng.randint(0, len(NUMBER_WORDS) - 4)
            prompt, target = " ".join(NUMBER_WORDS[start : start + 3]), f" {NUMBER_WORDS[start + 3]}"
        else:
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            prompt, target = f"{a} + {b} =", f" {a + b}"
        gen_docs.append({"prompt": prompt, "target": target})
    return mc_docs, rolling_docs, gen_docs


# What both the test and the benchmark pass to simple_evaluate: per-sample logs, no bootstrap, fixed seeds.
REPRODUCIBLE = {
    "log_samples": True,
    "bootstrap_iters": 0,
    "random_seed": 0,
    "numpy_random_seed": 0,
    "torch_random_seed": 0,
    "fewshot_random_seed": 0,
}
