"""Fine-tuning JSONL on the tiny Llama's byte tokenizer: exact token layouts, masks, and every rejection.

The byte tokenizer makes layouts checkable by hand: one token per UTF-8 byte, ``<|bos|>`` 256,
``<|eos|>`` 257, ``<|im_end|>`` 260.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GenerationConfig

from server.finetune.data import (
    PREFIX_PROBLEM,
    LineError,
    TrainingExample,
    TrainingFileError,
    count_training_examples,
    parse_training_file,
)
from server.models.tokenizer import BOS_TOKEN, EOS_TOKEN, IM_END_TOKEN, special_token_id

BOS = special_token_id(BOS_TOKEN)
EOS = special_token_id(EOS_TOKEN)
IM_END = special_token_id(IM_END_TOKEN)
MAX_TOKENS = 512
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Spectra."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def end_ids(tiny_llama_dir: Path) -> set[int]:
    """The ids generation stops at, read as the model runner reads them."""
    return set(GenerationConfig.from_pretrained(tiny_llama_dir).eos_token_id)


def jsonl(*lines: Any) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def one(data: bytes, tokenizer: Any, end_ids: set[int] | None) -> TrainingExample:
    (example,) = parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS, end_token_ids=end_ids)
    assert len(example.loss_mask) == example.n_tokens == len(example.input_ids)
    return example


def as_bytes(text: str) -> list[int]:
    return list(text.encode())


def served_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids /v1/chat/completions builds (server/api/routes/openai.py ``_chat_prompt``)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def trained_spans(example: TrainingExample) -> list[tuple[int, int]]:
    spans, start = [], None
    for position, trained in enumerate([*example.loss_mask, False]):
        if trained and start is None:
            start = position
        elif not trained and start is not None:
            spans.append((start, position))
            start = None
    return spans


def test_prompt_completion_is_bos_prompt_completion_eos_with_the_completion_and_eos_trained(tokenizer, end_ids) -> None:
    example = one(jsonl({"prompt": "Hi", "completion": " there", "id": 7}), tokenizer, end_ids)
    assert example.input_ids == (BOS, *as_bytes("Hi"), *as_bytes(" there"), EOS)
    assert example.loss_mask == (False,) * 3 + (True,) * 7
    assert example.input_ids[:3] == tuple(tokenizer.encode("Hi")), "the prompt is encoded as /generate encodes it"

    empty_prompt = one(jsonl({"prompt": "", "completion": "x"}), tokenizer, end_ids)
    assert empty_prompt.input_ids == (BOS, ord("x"), EOS)
    assert empty_prompt.loss_mask == (False, True, True)


def test_two_assistant_turns_train_exactly_their_segments_through_im_end(tokenizer, end_ids) -> None:
    example = one(jsonl({"messages": CHAT}), tokenizer, end_ids)
    first_prompt = served_chat_prompt(tokenizer, CHAT[:2])
    second_prompt = served_chat_prompt(tokenizer, CHAT[:4])
    first = [*as_bytes("Hello!"), IM_END]
    second = [*as_bytes("Spectra."), IM_END]

    assert list(example.input_ids[: len(first_prompt)]) == first_prompt
    assert list(example.input_ids[len(first_prompt) : len(first_prompt) + len(first)]) == first
    # The "\n" the template writes after <|im_end|> is context for the next turn, not a target.
    assert list(example.input_ids[: len(second_prompt)]) == second_prompt
    assert list(example.input_ids) == second_prompt + second, "the example ends at the last trained token"
    assert trained_spans(example) == [
        (len(first_prompt), len(first_prompt) + len(first)),
        (len(second_prompt), len(second_prompt) + len(second)),
    ]
    assert example.input_ids[0] == BOS and example.input_ids.count(BOS) == 1


def test_without_the_models_end_tokens_the_segment_is_trained_whole_and_gets_eos(tokenizer) -> None:
    example = one(jsonl({"messages": CHAT[:3]}), tokenizer, None)
    prompt = served_chat_prompt(tokenizer, CHAT[:2])
    segment = [*as_bytes("Hello!"), IM_END, ord("\n"), EOS]
    assert list(example.input_ids) == prompt + segment
    assert trained_spans(example) == [(len(prompt), len(prompt) + len(segment))]


def test_weight_zero_turns_are_context_and_turns_after_the_last_trained_one_are_dropped(tokenizer, end_ids) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "untrained", "weight": 0},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "trained", "weight": 1},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "dropped", "weight": 0},
    ]
    example = one(jsonl({"messages": messages}), tokenizer, end_ids)
    prompt = served_chat_prompt(tokenizer, messages[:3])
    assert list(example.input_ids) == [*prompt, *as_bytes("trained"), IM_END]
    assert trained_spans(example) == [(len(prompt), example.n_tokens)]
    assert b"untrained" in bytes(token for token in prompt if token < 256)


def test_blank_crlf_bom_and_unicode_lines_are_read_as_jsonl(tokenizer, end_ids) -> None:
    line = json.dumps({"prompt": "a\u2028b", "completion": "é"}, ensure_ascii=False)
    data = b"\xef\xbb\xbf" + f"{line}\r\n\r\n   \n{line}\n".encode()
    examples = parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS, end_token_ids=end_ids)
    assert len(examples) == 2 and examples[0] == examples[1]
    assert examples[0].input_ids == (BOS, *as_bytes("a\u2028b"), *as_bytes("é"), EOS)
    assert count_training_examples(data, tokenizer, max_tokens=MAX_TOKENS, end_token_ids=end_ids) == 2


def _rejections() -> list[tuple[str, str]]:
    """(line, reason); each on its own line of one file."""
    user = {"role": "user", "content": "q"}
    assistant = {"role": "assistant", "content": "a"}
    return [
        ('{"prompt": "a" "completion": "b"}', "invalid JSON (Expecting ',' delimiter at column 16)"),
        ('{"prompt": "a", ', "invalid JSON (Expecting property name enclosed in double quotes at column 17)"),
        ("[1, 2]", "not a JSON object"),
        ('"text"', "not a JSON object"),
        ('{"text": "x"}', "neither 'prompt'/'completion' nor 'messages'"),
        ('{"prompt": "x"}', "missing field 'completion'"),
        ('{"completion": "x"}', "missing field 'prompt'"),
        ('{"prompt": 1, "completion": "x"}', "field 'prompt' must be a string"),
        ('{"prompt": "x", "completion": null}', "field 'completion' must be a string"),
        ('{"prompt": "x", "completion": ""}', "empty completion"),
        ('{"prompt": "x", "completion": " \\n\\t"}', "empty completion"),
        (json.dumps({"prompt": "x", "completion": "y", "messages": []}), "both 'messages' and 'prompt'/'completion'"),
        ('{"messages": []}', "empty messages"),
        ('{"messages": "hi"}', "field 'messages' must be a list"),
        ('{"messages": ["hi"]}', "messages[0] must be a JSON object"),
        (json.dumps({"messages": [user, {"role": "tool", "content": "x"}]}), "unknown role 'tool' in messages[1]"),
        (json.dumps({"messages": [user, {"content": "x"}]}), "missing field 'messages[1].role'"),
        (json.dumps({"messages": [user, {"role": "assistant"}]}), "missing field 'messages[1].content'"),
        (json.dumps({"messages": [{**user, "content": ["x"]}]}), "field 'messages[0].content' must be a string"),
        (json.dumps({"messages": [user]}), "no assistant message to train on"),
        (json.dumps({"messages": [user, {**assistant, "weight": 0}]}), "no assistant message to train on"),
        (json.dumps({"messages": [user, {**assistant, "weight": 2}]}), "field 'messages[1].weight' must be 0 or 1"),
        (json.dumps({"messages": [user, {**assistant, "weight": True}]}), "field 'messages[1].weight' must be 0 or 1"),
        (json.dumps({"messages": [{**user, "weight": 1}, assistant]}), "messages[0].weight is only allowed on"),
        (json.dumps({"messages": [user, {**assistant, "content": " "}]}), "empty completion in messages[1].content"),
        (json.dumps({"messages": [assistant]}), "the chat template rejected the messages: Cannot apply chat template"),
        (json.dumps({"prompt": "p", "completion": "c" * 40}), "43 tokens; the limit is 40"),
    ]  # fmt: skip


def test_every_invalid_line_is_reported_with_its_number_and_reason(tokenizer, end_ids) -> None:
    cases = _rejections()
    good = json.dumps({"prompt": "fine", "completion": "yes"})
    # Good and blank lines between the bad ones: numbers count every physical line.
    lines = [good, ""] + [line for text, _ in cases for line in (text, good)]
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(jsonl(*lines), tokenizer, max_tokens=40, max_errors=100, end_token_ids=end_ids)
    error = caught.value
    assert error.status_code == 422 and error.total_errors == len(cases)
    expected_lines = [3 + 2 * index for index in range(len(cases))]
    assert [line_error.line for line_error in error.errors] == expected_lines
    for line_error, (text, reason) in zip(error.errors, cases, strict=True):
        assert line_error.reason.startswith(reason), f"{text}: {line_error.reason}"
        assert f"line {line_error.line}: {line_error.reason}" in error.message
    assert error.message.startswith(f"training file has {len(cases)} invalid lines: line 3: invalid JSON")


def test_template_errors_and_non_prefix_templates_are_line_errors(tokenizer, tiny_llama_dir, end_ids) -> None:
    messages = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = jsonl(messages, {"prompt": "", "completion": "ok"})

    raising = AutoTokenizer.from_pretrained(tiny_llama_dir)
    raising.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, raising, max_tokens=MAX_TOKENS, end_token_ids=end_ids)
    assert caught.value.errors == [LineError(1, "the chat template rejected the messages: roles must alternate")]

    last_only = AutoTokenizer.from_pretrained(tiny_llama_dir)
    last_only.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, last_only, max_tokens=MAX_TOKENS, end_token_ids=end_ids)
    assert caught.value.errors == [LineError(1, PREFIX_PROBLEM)]

    untemplated = AutoTokenizer.from_pretrained(tiny_llama_dir)
    untemplated.chat_template = None
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, untemplated, max_tokens=MAX_TOKENS, end_token_ids=end_ids)
    assert caught.value.errors == [LineError(1, "the model has no chat template; use prompt/completion lines")]


def test_the_report_lists_max_errors_lines_and_counts_the_rest(tokenizer) -> None:
    data = jsonl(*[{"prompt": "x"}] * 25)
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS)
    error = caught.value
    assert error.total_errors == 25 and [e.line for e in error.errors] == list(range(1, 21))
    assert error.message.startswith("training file has 25 invalid lines: line 1: missing field 'completion'; line 2:")
    assert error.message.endswith("; line 20: missing field 'completion'; ... and 5 more")

    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS, max_errors=2)
    assert caught.value.message == (
        "training file has 25 invalid lines: line 1: missing field 'completion'; "
        "line 2: missing field 'completion'; ... and 23 more"
    )

    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(jsonl({"prompt": "x", "completion": "y"}, "{}"), tokenizer, max_tokens=MAX_TOKENS)
    assert caught.value.message == (
        "training file has 1 invalid line: line 2: neither 'prompt'/'completion' nor 'messages'"
    )


def test_a_file_that_is_not_utf8_is_rejected_with_the_line_of_the_bad_byte(tokenizer) -> None:
    data = jsonl({"prompt": "a", "completion": "b"}) + b'\n{"prompt": "\xff", "completion": "b"}'
    with pytest.raises(TrainingFileError) as caught:
        parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS)
    assert caught.value.message == "the training file is not UTF-8 text (invalid byte at line 2)"
    assert caught.value.errors == [] and caught.value.status_code == 422


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n\t\n"])
def test_an_empty_file_has_no_examples(tokenizer, data: bytes) -> None:
    with pytest.raises(TrainingFileError, match=r"has no examples \(it is empty or only blank lines\)"):
        parse_training_file(data, tokenizer, max_tokens=MAX_TOKENS)
