"""lm-evaluation-harness against a real ``spectra serve``: the harness users run, end to end.

Three tiny tasks are defined as YAML in a temp dir on JSONL files the test writes (``dataset_path: json``,
nothing downloaded; the writer, ``bench/lm_eval_tasks.py``, is shared with ``bench/lm_eval_run.py``):
multiple choice (loglikelihood), loglikelihood_rolling (perplexity) and generate_until (greedy, short
``until`` stops). Each runs in-process through ``lm_eval.simple_evaluate`` twice: with ``local-completions``
against the server's ``/v1/completions`` (token-id prompts, ``echo`` + ``logprobs``) and with the ``hf``
backend on the same model directory (PEFT's ``PeftModel`` for the adapter), which is the oracle. Per-sample
log-likelihoods agree within 1e-3, is_greedy flags agree and the greedy generations are the same strings,
for the base model and for the FourierFT adapter "alpha". ``local-chat-completions``
(``apply_chat_template``) is checked against direct POSTs of the same messages.

BOS (c): this byte tokenizer prepends ``<|bos|>`` by default (``add_special_tokens=True``). lm-eval's
``hf`` backend leaves ``add_bos_token`` unset, so it encodes with the tokenizer's default and every
context starts with ``<|bos|>``; the API backends default to ``add_bos_token=False`` and would send the
same text without it, so the two would score different sequences (a difference that is not the server's).
We pass ``add_bos_token=True`` to ``local-completions`` rather than ``add_bos_token=False`` to ``hf``:
``<|bos|>``-first is what this model sees when the server is sent a string prompt, so it is the
scoring a user wants. ``test_bos_handling_matches_hf`` asserts both halves of that on the token ids.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

# The harness and ``datasets`` read these at import: nothing may be downloaded, ever.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval
from lm_eval.tasks import TaskManager

from bench.lm_eval_tasks import GEN_TASK, MC_TASK, REPRODUCIBLE, ROLLING_TASK, write_tasks

if TYPE_CHECKING:  # imported for real by pytest_plugins only, so that pytest can rewrite its asserts
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]
pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

ADAPTER_ID = "alpha"
LOGLIK_TOLERANCE = 1e-3
MAX_GEN_TOKS = 8
UNTIL = ["\n", "."]

# Everything stays under the http_server fixture's --max-input-tokens (64, one token per byte + <|bos|>),
# chat template included. target_delimiter is "" so that each choice is scored exactly as written.
MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", "&", "((((("], "answer": 0},
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
    {"question": "Cats say", "choices": [" meow", " woof", " moo", " quack"], "answer": 0},
    {"question": "Q: capital of France?\nA:", "choices": [" Paris", " Rome", " Oslo"], "answer": 0},
    # a trailing space in the context: lm-eval moves it to the front of the continuation
    {"question": "Water is ", "choices": ["wet", "dry"], "answer": 0},
    {"question": "ABC", "choices": ["D", "DE", "DEF"], "answer": 2},
    {"question": "Hello,", "choices": ["m", " world", " there"], "answer": 1},
    {"question": "one two three", "choices": [" four", " five", " 4"], "answer": 0},
]
ROLLING_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Spectra serves many adapters."},
]
GEN_DOCS = [
    {"prompt": "The sky is", "target": " blue"},
    {"prompt": "2 + 2 =", "target": " 4"},
    {"prompt": "Hello,", "target": " world"},
    {"prompt": "Once upon a time", "target": " there"},
]
TASK_SIZES = {MC_TASK: len(MC_DOCS), ROLLING_TASK: len(ROLLING_DOCS), GEN_TASK: len(GEN_DOCS)}


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    """The three tasks as YAML files in one include_path (lm-eval's own tasks are not indexed)."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    return write_tasks(directory, MC_DOCS, ROLLING_DOCS, GEN_DOCS, until=UNTIL, max_gen_toks=MAX_GEN_TOKS)


def _evaluate(
    model: Any, model_args: dict[str, Any] | None, tasks: list[str], manager: TaskManager, **kwargs: Any
) -> dict:
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=manager,
        **REPRODUCIBLE,
        **kwargs,
    )
    assert results is not None
    samples = {task: sorted(items, key=lambda s: s["doc_id"]) for task, items in results["samples"].items()}
    for task in tasks:  # one sample per doc: nothing was silently dropped
        assert [s["doc_id"] for s in samples[task]] == list(range(TASK_SIZES[task])), task
    return samples


def _hf_args(tiny_llama_dir: Path) -> dict[str, Any]:
    return {"pretrained": str(tiny_llama_dir), "dtype": "float32", "device": "cpu"}


def _completions_args(base_url: str, model: str, tokenizer_dir: Path) -> dict[str, Any]:
    return {
        "base_url": f"{base_url}/v1/completions",
        "model": model,
        "tokenizer": str(tokenizer_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "add_bos_token": True,  # see the module docstring (c)
        "num_concurrent": 2,
        "max_retries": 1,
        "timeout": 60,
    }


def _choice_logliks(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per doc, per choice: (loglikelihood, is_greedy) as lm-eval recorded them."""
    out = []
    for sample in samples:
        assert len(sample["resps"]) == len(sample["filtered_resps"])
        out.append([(float(ll), bool(greedy)) for ll, greedy in sample["filtered_resps"]])
    return out


def _rolling_logliks(samples: list[dict]) -> list[float]:
    return [float(sample["filtered_resps"][0]) for sample in samples]


def _generations(samples: list[dict]) -> list[str]:
    return [sample["filtered_resps"][0] for sample in samples]


def _hf_with_peft(tiny_llama_dir: Path, adapter_dir: Path) -> Any:
    """lm-eval's ``hf`` backend on ``PeftModel.from_pretrained(base, adapter_dir)``.

    Not ``model_args peft=DIR``: with it lm-eval 0.4.13 first calls ``resize_token_embeddings(len(tokenizer))``
    whenever ``config.vocab_size != len(tokenizer)`` (here 264, padded to a multiple of 8, vs 261), which cuts
    the three padding rows off ``lm_head``, so every token's log-softmax is over 261 logits instead of 264
    (about +0.011 per token here; the server and plain PEFT agree to 5e-7). That is a quirk of the harness,
    not an adapter's semantics, so the oracle is PEFT on the unresized model.
    """
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    hf = HFLM(**_hf_args(tiny_llama_dir))
    assert hf.model.config.vocab_size != len(hf.tokenizer)  # the case the docstring is about
    hf._model = PeftModel.from_pretrained(hf._model, str(adapter_dir)).eval()
    return hf


@pytest.fixture(scope="module")
def hf_results(tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], task_manager: TaskManager) -> dict:
    """The oracle: lm-eval's ``hf`` backend, for the base model and for PEFT's adapter "alpha"."""
    tasks = [MC_TASK, ROLLING_TASK, GEN_TASK]
    return {
        None: _evaluate("hf", _hf_args(tiny_llama_dir), tasks, task_manager),
        ADAPTER_ID: _evaluate(_hf_with_peft(tiny_llama_dir, peft_adapter_dirs[ADAPTER_ID]), None, tasks, task_manager),
    }


def test_bos_handling_matches_hf(tiny_llama_dir: Path) -> None:
    """(c) local-completions with add_bos_token=True encodes exactly the ids the hf backend scores and
    generates from; with lm-eval's API default (False) it would drop the <|bos|>."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    hf = HFLM(**_hf_args(tiny_llama_dir))
    args = _completions_args("http://127.0.0.1:9", "unused", tiny_llama_dir)  # nothing is sent
    api = LocalCompletionsAPI(**args)
    api_default = LocalCompletionsAPI(**{**args, "add_bos_token": False})
    bos = hf.tokenizer.bos_token_id
    assert hf.add_bos_token is None and api.add_bos_token is True
    for doc in MC_DOCS:
        for choice in doc["choices"]:
            pair = hf._encode_pair(doc["question"], choice)
            assert pair[0][0] == bos
            assert api._encode_pair(doc["question"], choice) == pair
            assert api_default._encode_pair(doc["question"], choice) == (pair[0][1:], pair[1])
    prompts = [doc["prompt"] for doc in GEN_DOCS]
    assert api.tok_encode(prompts, add_special_tokens=api.add_bos_token) == [hf.tok_encode(p) for p in prompts]
    assert hf.tok_batch_encode(prompts[:1])[0][0].tolist() == hf.tok_encode(prompts[0])
    assert api.prefix_token_id == hf.prefix_token_id == bos


# batch_size 1: each request's prompt is a list of one token-id list; 4: several, one choice each, by index.
@pytest.mark.parametrize("batch_size", [1, 4], ids=["batch1", "batch4"])
@pytest.mark.parametrize("adapter", [None, ADAPTER_ID], ids=["base", "adapter"])
def test_local_completions_match_hf(
    adapter: str | None, batch_size: int, http_server: Server, hf_results: dict, task_manager: TaskManager
) -> None:
    started = time.monotonic()
    model = adapter or http_server.model_name
    served = _evaluate(
        "local-completions",
        {**_completions_args(http_server.base_url, model, http_server.model_dir), "batch_size": batch_size},
        [MC_TASK, ROLLING_TASK, GEN_TASK],
        task_manager,
    )
    oracle = hf_results[adapter]

    expected, got = _choice_logliks(oracle[MC_TASK]), _choice_logliks(served[MC_TASK])
    assert [len(c) for c in got] == [len(doc["choices"]) for doc in MC_DOCS]
    deltas = [abs(g[0] - e[0]) for gd, ed in zip(got, expected, strict=True) for g, e in zip(gd, ed, strict=True)]
    assert all(math.isfinite(g[0]) and g[0] < 0 for doc in got for g in doc)
    assert max(deltas) < LOGLIK_TOLERANCE, (max(deltas), got, expected)
    assert [[g[1] for g in doc] for doc in got] == [[e[1] for e in doc] for doc in expected]

    expected_rolling, got_rolling = _rolling_logliks(oracle[ROLLING_TASK]), _rolling_logliks(served[ROLLING_TASK])
    rolling_deltas = [abs(g - e) for g, e in zip(got_rolling, expected_rolling, strict=True)]
    assert max(rolling_deltas) < LOGLIK_TOLERANCE, (got_rolling, expected_rolling)

    logger.info(
        f"[{model}, batch_size {batch_size}] max |dloglik| multiple_choice {max(deltas):.2e}, "
        f"rolling {max(rolling_deltas):.2e}; "
        f"generations {_generations(served[GEN_TASK])}; {time.monotonic() - started:.1f}s"
    )
    assert _generations(served[GEN_TASK]) == _generations(oracle[GEN_TASK])


def test_oracle_is_not_vacuous(hf_results: dict) -> None:
    """The comparisons above can fail: the adapter moves most likelihoods (every rolling one) well past the
    tolerance and changes greedy flags and generations, and some choices are greedy at all."""
    base, adapted = hf_results[None], hf_results[ADAPTER_ID]
    base_ll, adapted_ll = _choice_logliks(base[MC_TASK]), _choice_logliks(adapted[MC_TASK])
    pairs = [(b, a) for bd, ad in zip(base_ll, adapted_ll, strict=True) for b, a in zip(bd, ad, strict=True)]
    assert len(pairs) == sum(len(doc["choices"]) for doc in MC_DOCS)
    # The tiny adapter moves some likelihoods only a little: a server that ignored it must still fail
    # test_local_completions_match_hf[adapter], so most choices move by well over the tolerance.
    moved = [abs(b[0] - a[0]) > 10 * LOGLIK_TOLERANCE for b, a in pairs]
    assert sum(moved) >= len(pairs) // 2 and max(abs(b[0] - a[0]) for b, a in pairs) > 0.1
    assert any(b[1] for b, _ in pairs) and any(a[1] for _, a in pairs)
    assert [b[1] for b, _ in pairs] != [a[1] for _, a in pairs]
    assert all(
        abs(b - a) > 10 * LOGLIK_TOLERANCE
        for b, a in zip(_rolling_logliks(base[ROLLING_TASK]), _rolling_logliks(adapted[ROLLING_TASK]), strict=True)
    )
    assert _generations(base[GEN_TASK]) != _generations(adapted[GEN_TASK])


@pytest.mark.parametrize("adapter", [None, ADAPTER_ID], ids=["base", "adapter"])
def test_local_chat_completions(adapter: str | None, http_server: Server, task_manager: TaskManager) -> None:
    """(b) The chat backend runs generate_until to completion, and each response is what a direct POST of
    the same messages returns."""
    model = adapter or http_server.model_name
    args = {
        "base_url": f"{http_server.base_url}/v1/chat/completions",
        "model": model,
        "tokenized_requests": False,
        "num_concurrent": 2,
        "max_retries": 1,
        "timeout": 60,
    }
    samples = _evaluate("local-chat-completions", args, [GEN_TASK], task_manager, apply_chat_template=True)
    responses = _generations(samples[GEN_TASK])
    direct = []
    for doc in GEN_DOCS:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": doc["prompt"]}],
            "max_tokens": MAX_GEN_TOKS,
            "temperature": 0,
            "stop": UNTIL,
            "seed": 1234,
        }
        response = httpx.post(f"{http_server.base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        direct.append(response.json()["choices"][0]["message"]["content"])
    logger.info(f"[{model}] chat responses {responses}")
    assert responses == direct
    for sample, doc in zip(samples[GEN_TASK], GEN_DOCS, strict=True):  # what lm-eval sent
        sent = sample["arguments"][0][0]  # lm-eval's JsonChatStr: the messages as JSON
        assert json.loads(sent.prompt) == [{"role": "user", "content": doc["prompt"]}]
