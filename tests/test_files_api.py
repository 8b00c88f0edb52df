"""Training files over HTTP against real ``spectra serve`` processes, through the ``openai`` SDK.

Uploads are validated against the served tokenizer and context limit before anything is stored;
a rejected upload names every bad line and leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from server.finetune.data import parse_training_file

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

MAX_TRAINING_FILE_BYTES = 64 * 1024
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def files_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(
        tiny_llama_dir,
        tmp_path_factory.mktemp("files-api"),
        {},
        "--max-training-file-bytes",
        str(MAX_TRAINING_FILE_BYTES),
    )
    yield server
    stop_server(server)


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def jsonl(*lines: object) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


GOOD = jsonl({"prompt": "Hi", "completion": " there"}, {"messages": CHAT}, {"prompt": "", "completion": "x"})


def listed_ids(server: Server) -> list[str]:
    return [file.id for file in sdk(server).files.list()]


def test_upload_list_retrieve_download_and_delete_through_the_openai_sdk(files_server: Server) -> None:
    client = sdk(files_server)
    created = client.files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(GOOD),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.retrieve(created.id) == created
    assert created.id in listed_ids(files_server)
    assert client.files.content(created.id).content == GOOD

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    assert created.id not in listed_ids(files_server)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.files.retrieve(created.id)


def test_identical_uploads_are_separate_files_and_the_listing_pages_newest_first(files_server: Server) -> None:
    client = sdk(files_server)
    uploaded = [client.files.create(file=(f"{index}.jsonl", GOOD), purpose="fine-tune").id for index in range(3)]
    assert len(set(uploaded)) == 3
    # The SDK follows has_more/after by itself; limit=2 makes it fetch more than one page.
    listed = [file.id for file in client.files.list(limit=2)]
    assert listed[:3] == uploaded[::-1]
    first_page = client.files.list(limit=2)
    assert first_page.has_more is True and [file.id for file in first_page.data] == uploaded[:0:-1]
    page = httpx.get(f"{files_server.base_url}/v1/files", params={"limit": 2}).json()
    assert page["object"] == "list" and page["first_id"] == uploaded[2] and page["last_id"] == uploaded[1]
    assert httpx.get(f"{files_server.base_url}/v1/files", params={"purpose": "batch"}).json()["data"] == []
    client.files.delete(uploaded[0])
    assert client.files.content(uploaded[1]).content == GOOD, "a shared blob stays while another file uses it"


def test_a_file_with_bad_lines_is_refused_with_every_line_and_nothing_is_stored(files_server: Server) -> None:
    client = sdk(files_server)
    before = listed_ids(files_server)
    data = jsonl(
        {"prompt": "ok", "completion": "fine"},
        '{"prompt": "a" "completion": "b"}',
        {"prompt": "no completion"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"prompt": "long", "completion": "z" * 5000},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    )
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.files.create(file=("bad.jsonl", data), purpose="fine-tune")
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "file"
    assert body["message"] == (
        "training file has 5 invalid lines: line 2: invalid JSON (Expecting ',' delimiter at column 16); "
        "line 3: missing field 'completion'; line 4: no assistant message to train on; "
        "line 5: 5006 tokens; the limit is 4096; "
        "line 6: unknown role 'robot' in messages[0] (expected system, user or assistant)"
    )
    assert listed_ids(files_server) == before
    assert httpx.get(f"{files_server.base_url}/health").status_code == 200


def test_wrong_purpose_unknown_ids_and_oversized_files_are_refused(files_server: Server) -> None:
    client, base = sdk(files_server), files_server.base_url
    before = listed_ids(files_server)
    with pytest.raises(openai.UnprocessableEntityError, match="purpose 'assistants' is not supported") as caught:
        client.files.create(file=("train.jsonl", GOOD), purpose="assistants")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError, match="has no examples"):
        client.files.create(file=("empty.jsonl", b"\n\n"), purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError, match="not UTF-8"):
        client.files.create(file=("latin1.jsonl", b'{"prompt": "\xe9", "completion": "x"}'), purpose="fine-tune")

    over = GOOD * (MAX_TRAINING_FILE_BYTES // len(GOOD) + 1)
    with pytest.raises(openai.APIStatusError, match=f"the limit is {MAX_TRAINING_FILE_BYTES}") as too_large:
        client.files.create(file=("big.jsonl", over), purpose="fine-tune")
    assert too_large.value.status_code == 413
    body = b"x" * (MAX_TRAINING_FILE_BYTES + (2 << 20))
    response = httpx.post(f"{base}/v1/files", data={"purpose": "fine-tune"}, files={"file": ("huge.jsonl", body)})
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]["message"]
    assert listed_ids(files_server) == before

    for request in (
        lambda: client.files.retrieve("file-000000000000000000000000"),
        lambda: client.files.content("file-000000000000000000000000"),
        lambda: client.files.delete("file-000000000000000000000000"),
        lambda: client.files.list(after="file-000000000000000000000000"),
    ):
        with pytest.raises(openai.NotFoundError):
            request()
    error = httpx.get(f"{base}/v1/files/nope").json()["error"]
    assert error == {"message": "file 'nope' not found", "type": "not_found_error", "param": "file_id", "code": 404}


def test_a_file_whose_blob_was_damaged_reports_error_and_its_content_is_a_409(files_server: Server) -> None:
    client = sdk(files_server)
    data = jsonl({"prompt": "damaged", "completion": "soon"})
    created = client.files.create(file=("damaged.jsonl", data), purpose="fine-tune")
    sha256 = hashlib.sha256(data).hexdigest()
    (files_server.log_path.parent / "files" / "blobs" / sha256[:2] / sha256).write_bytes(b"not the uploaded bytes")
    with pytest.raises(openai.ConflictError, match=r"is broken .*fails its sha256 check.*upload it again"):
        client.files.content(created.id)
    shown = client.files.retrieve(created.id)
    assert shown.status == "error" and "fails its sha256 check" in str(shown.status_details)
    client.files.delete(created.id)


def test_the_first_chat_context_is_the_prompt_the_server_builds_for_the_same_messages(
    files_server: Server, tiny_llama_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (example,) = parse_training_file(jsonl({"messages": CHAT}), tokenizer, max_tokens=4096)
    context = example.loss_mask.index(True)
    completion = sdk(files_server).chat.completions.create(
        model=files_server.model_name, messages=CHAT[:2], max_tokens=1, temperature=0
    )
    assert completion.usage is not None and completion.usage.prompt_tokens == context


def test_a_stored_file_survives_a_restart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.http_fixtures import start_server, stop_server

    server = start_server(tiny_llama_dir, tmp_path, {})
    try:
        created = sdk(server).files.create(file=("keep.jsonl", GOOD), purpose="fine-tune")
    finally:
        stop_server(server)
    server = start_server(tiny_llama_dir, tmp_path, {})
    try:
        client = sdk(server)
        assert client.files.retrieve(created.id) == created
        assert client.files.content(created.id).content == GOOD
        assert listed_ids(server) == [created.id]
    finally:
        stop_server(server)
