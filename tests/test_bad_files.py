"""Malicious and invalid uploads against a real ``spectra serve``: adapters (``/v1/adapters``) and
training files (``/v1/files``), then a blob damaged on disk while the server runs and across a restart.

Every bad upload must get its exact 4xx with a message that says what is wrong, leave the store as it
was (listings, blobs and temp files on disk), write nothing outside the data dir, and leave the server
healthy: after the whole corpus, ``/health`` is 200 and generation gives the tokens it gave before.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import pickle
import signal
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.engine.model_runner import ModelRunner
from server.spectral.formats import native
from server.spectral.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from tests.engine_fixtures import random_adapter

if TYPE_CHECKING:
    from tests.http_fixtures import Server

pytest_plugins = ["tests.http_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent  # the servers' working directory

MAX_ADAPTER_BYTES = 64 * 1024
MAX_TRAINING_FILE_BYTES = 512 * 1024  # room for a line of 100k nested lists
TOKENS = 8
Q = "model.layers.0.self_attn.q_proj"  # 64 x 64
V = "model.layers.0.self_attn.v_proj"  # 32 x 64 (GQA)
PEFT_Q = f"base_model.model.{Q}.fourierft_spectrum"
# Traversal targets carry this name, so a stray write anywhere is unmistakable.
EVIL = "spectra-bad-files-evil"


# -- the servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tiny_llama_dir: Path) -> dict[str, tuple[int, int]]:
    return ModelRunner(tiny_llama_dir, dtype="float32", device="cpu").module_shapes


@dataclass
class Target:
    server: Server
    root: Path  # holds the data dir three levels down, so "../../x" relative to it would still land here
    reference: dict[str | None, list[int]] = field(default_factory=dict)  # greedy tokens before the corpus


@pytest.fixture(scope="module")
def target(
    tiny_llama_dir: Path, peft_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    from tests.http_fixtures import start_server, stop_server

    root = tmp_path_factory.mktemp("bad-files")
    data_dir = root / "one" / "two" / "data"
    data_dir.mkdir(parents=True)
    server = start_server(
        tiny_llama_dir,
        data_dir,
        {"alpha": peft_adapter_dirs["alpha"]},
        "--max-adapter-bytes",
        str(MAX_ADAPTER_BYTES),
        "--max-training-file-bytes",
        str(MAX_TRAINING_FILE_BYTES),
    )
    try:
        yield Target(server, root, {adapter: greedy(server, adapter) for adapter in (None, "alpha")})
    finally:
        stop_server(server)


@functools.cache
def http() -> httpx.Client:
    """One client for the whole module: a fresh ``httpx.get`` pays for a new client (and SSL context) each call."""
    return httpx.Client(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _close_the_client() -> Iterator[None]:
    yield
    http().close()
    http.cache_clear()


def greedy(server: Server, adapter_id: str | None) -> list[int]:
    parameters = {"max_new_tokens": TOKENS, "details": True, "adapter_id": adapter_id}
    response = http().post(
        f"{server.base_url}/generate", json={"inputs": "Spectral", "parameters": parameters}, timeout=60
    )
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def generate(server: Server, adapter_id: str | None) -> httpx.Response:
    body = {"inputs": "Spectral", "parameters": {"max_new_tokens": 2, "adapter_id": adapter_id}}
    return http().post(f"{server.base_url}/generate", json=body, timeout=60)


def upload_adapter(server: Server, files: list[tuple[str, bytes]], **form: str) -> httpx.Response:
    return http().post(
        f"{server.base_url}/v1/adapters",
        data={"adapter_id": "bad/candidate", **form},
        files=[("file", (name, data)) for name, data in files],
        timeout=60,
    )


def upload_training_file(server: Server, name: str, data: bytes, purpose: str = "fine-tune") -> httpx.Response:
    return http().post(
        f"{server.base_url}/v1/files", data={"purpose": purpose}, files={"file": (name, data)}, timeout=60
    )


def data_dir_of(server: Server) -> Path:
    return server.log_path.parent


def store_snapshot(server: Server) -> tuple[Any, ...]:
    """Both listings and every file under the adapter and training-file blob dirs (temp dirs included)."""
    adapters = http().get(f"{server.base_url}/v1/adapters", params={"limit": 1000}).json()["data"]
    files = http().get(f"{server.base_url}/v1/files", params={"limit": 10000}).json()["data"]
    data_dir = data_dir_of(server)
    blobs = sorted(
        str(path.relative_to(data_dir))
        for store in ("adapters/blobs", "files/blobs")
        for path in (data_dir / store).rglob("*")
        if path.is_file()
    )
    return adapters, files, blobs


def outside_snapshot(target: Target) -> tuple[Any, ...]:
    """Files next to the data dir (up to the temp root), stray traversal targets in the server's cwd, /etc/passwd."""
    data_dir = data_dir_of(target.server)
    around = sorted(str(path) for path in target.root.rglob("*") if path.is_file() and data_dir not in path.parents)
    strays = sorted(str(path) for path in REPO_ROOT.glob(f"{EVIL}*")) + sorted(
        str(path) for path in REPO_ROOT.parent.glob(f"{EVIL}*")
    )
    passwd = Path("/etc/passwd")
    return around, strays, passwd.stat().st_mtime_ns if passwd.exists() else None


def message_of(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


# -- building bad adapter files ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    files: list[tuple[str, bytes]]
    status: int
    fragment: str
    form: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Good:
    """A valid native adapter (q and v of both layers, n=40) and its parts, to be broken one way at a time."""

    data: bytes
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, int]]) -> Good:
        data = native.to_bytes(random_adapter(shapes, 7, n=40))
        metadata = header_of(data)["__metadata__"]
        return cls(data, load_safetensors(data), metadata, json.loads(metadata["modules"]))

    @property
    def q_locations(self) -> str:
        return self.modules[Q]["locations"]

    def edit(
        self,
        tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
        metadata: Callable[[dict[str, str]], object] | None = None,
        modules: Callable[[dict[str, dict[str, Any]]], object] | None = None,
    ) -> bytes:
        """The file with ``tensors``/``metadata``/``modules`` mutated in place by the given functions."""
        new_tensors = {name: tensor.clone() for name, tensor in self.tensors.items()}
        new_metadata = dict(self.metadata)
        new_modules = json.loads(json.dumps(self.modules))
        if tensors:
            tensors(new_tensors)
        if modules:
            modules(new_modules)
            new_metadata["modules"] = json.dumps(new_modules)
        if metadata:
            metadata(new_metadata)
        return save_safetensors(new_tensors, metadata=new_metadata)


def header_of(data: bytes) -> dict[str, Any]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])


def with_header(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


def with_modules_text(good: Good, text: str) -> bytes:
    """The modules metadata replaced by raw text (JSON that json.dumps cannot write: NaN, huge numbers)."""
    return good.edit(metadata=lambda m: m.__setitem__("modules", text))


def set_tensor(name: Callable[[Good], str], change: Callable[[torch.Tensor], torch.Tensor]):
    return lambda good: good.edit(tensors=lambda t: t.__setitem__(name(good), change(t[name(good)])))


def set_module(key: str, value: Any):
    return lambda good: good.edit(modules=lambda m: m[Q].__setitem__(key, value))


def coef(good: Good) -> str:
    return f"coef.{Q}"


def locations(good: Good) -> str:
    return good.q_locations


def _set(tensor: torch.Tensor, index: tuple[int, int], value: int) -> torch.Tensor:
    tensor[index] = value
    return tensor


def _more_coefficients_than_the_layer_has(good: Good) -> bytes:
    n = 32 * 64 + 1  # v_proj is 32 x 64
    flat = torch.arange(n) % (32 * 64)
    return good.edit(
        tensors=lambda t: t.update(
            {f"coef.{V}": torch.ones(n), good.modules[V]["locations"]: torch.stack([flat // 64, flat % 64]).short()}
        )
    )


def _duplicate_location(locations: torch.Tensor) -> torch.Tensor:
    locations[:, 1] = locations[:, 0]
    return locations


def _pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({PEFT_Q: torch.ones(4)}, buffer)  # torch's zip container around a pickle
    return buffer.getvalue()


class _Exploit:
    """What an attacker's pickle would run on load; nothing here ever loads it."""

    def __reduce__(self):
        return (print, (f"{EVIL}: a pickle was loaded",))


def _peft_config(**overrides: Any) -> bytes:
    config = {"peft_type": "FOURIERFT", "n_frequency": 4, "scaling": 1.0, "random_loc_seed": 1} | overrides
    return json.dumps(config).encode()


def _peft(config: bytes, weights: dict[str, torch.Tensor] | None = None) -> list[tuple[str, bytes]]:
    tensors = {PEFT_Q: torch.ones(4)} if weights is None else weights
    return [(CONFIG_NAME, config), (WEIGHTS_NAME, save_safetensors(tensors))]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_bomb(expanded_bytes: int) -> bytes:
    """One member of ``expanded_bytes`` zeros, streamed into the archive (never held in memory at once)."""
    buffer = io.BytesIO()
    chunk = bytes(1 << 20)
    with (
        zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open(WEIGHTS_NAME, "w", force_zip64=True) as member,
    ):
        for _ in range(expanded_bytes // len(chunk)):
            member.write(chunk)
    return buffer.getvalue()


NOT_SAFETENSORS = "not a safetensors file"
INVALID_SAFETENSORS = "not a valid safetensors file"
NAME = "adapter.safetensors"


def one(data: bytes, status: int, fragment: str, **form: str) -> Case:
    """A single native file named ``adapter.safetensors``."""
    return Case([(NAME, data)], status, fragment, form)


def meta(key: str, value: str) -> Callable[[Good], bytes]:
    return lambda good: good.edit(metadata=lambda m: m.__setitem__(key, value))


def tensor_header(shape: str, offsets: str = "[0, 16]") -> bytes:
    header = f'{{"x": {{"dtype": "F32", "shape": {shape}, "data_offsets": {offsets}}}}}'
    return with_header(header.encode(), bytes(16))


def rename_q(good: Good) -> bytes:
    other = "model.layers.9.self_attn.q_proj"
    return good.edit(
        modules=lambda m: m.__setitem__(other, m.pop(Q)),
        tensors=lambda t: t.__setitem__(f"coef.{other}", t.pop(f"coef.{Q}")),
    )


# case id -> builder of the upload, its status and a fragment of its message.
# "was 500" / "was accepted" / "hung" mark the gaps this suite found and fixed.
ADAPTER_CASES: dict[str, Callable[[Good], Case]] = {
    # pickles: refused by name, or as bytes that are not safetensors; never unpickled
    "pickle-adapter_model.bin": lambda g: Case(
        [("adapter_model.bin", _pickle_bytes())], 422, "pickles and are never loaded"
    ),
    "pickle-bin-with-peft-config": lambda g: Case(
        [(CONFIG_NAME, _peft_config()), ("adapter_model.bin", _pickle_bytes())], 415, "is a pickle and is never loaded"
    ),
    "pickle-named-safetensors": lambda g: one(pickle.dumps(_Exploit()), 422, NOT_SAFETENSORS),
    "torch-save-named-safetensors": lambda g: one(_pickle_bytes(), 422, NOT_SAFETENSORS),
    "pickle-as-peft-weights": lambda g: Case(
        [(CONFIG_NAME, _peft_config()), (WEIGHTS_NAME, pickle.dumps(_Exploit()))], 422, NOT_SAFETENSORS
    ),
    # the container
    "empty-file": lambda g: one(b"", 422, "too short to be safetensors"),
    "truncated-mid-length": lambda g: one(g.data[:5], 422, "too short to be safetensors"),
    "truncated-mid-header": lambda g: one(
        g.data[: 8 + int.from_bytes(g.data[:8], "little") // 2], 422, "header claims"
    ),
    "truncated-mid-data": lambda g: one(g.data[:-100], 422, INVALID_SAFETENSORS),
    "header-length-2**40": lambda g: one(
        (1 << 40).to_bytes(8, "little") + g.data[8:], 422, "header claims 1099511627776 bytes"
    ),
    "header-length-u64-max": lambda g: one(b"\xff" * 8 + g.data[8:], 422, f"header claims {(1 << 64) - 1} bytes"),
    "header-length-past-the-end": lambda g: one(
        (len(g.data) - 7).to_bytes(8, "little") + g.data[8:], 422, "header claims"
    ),
    "header-not-json": lambda g: one(with_header(b"this is not json at all!"), 422, INVALID_SAFETENSORS),
    "header-not-utf8": lambda g: one(with_header(b"\xff\xfe{}\x80"), 422, INVALID_SAFETENSORS),
    "header-json-array": lambda g: one(with_header(b"[1, 2, 3]"), 422, INVALID_SAFETENSORS),
    "header-json-string": lambda g: one(with_header(b'"spectra"'), 422, INVALID_SAFETENSORS),
    "header-nested-20k-deep": lambda g: one(with_header(b"[" * 20_000), 422, INVALID_SAFETENSORS),  # was 500
    "header-metadata-not-strings": lambda g: one(
        with_header(b'{"__metadata__": {"format": 1}}'), 422, INVALID_SAFETENSORS
    ),
    "tensor-shape-gigantic": lambda g: one(tensor_header("[4611686018427387904]"), 422, INVALID_SAFETENSORS),
    "tensor-shape-overflows": lambda g: one(tensor_header("[4294967296, 4294967296]"), 422, INVALID_SAFETENSORS),
    "tensor-offsets-past-the-end": lambda g: one(tensor_header("[4]", "[0, 1000000000000]"), 422, INVALID_SAFETENSORS),
    # the native format's metadata
    "not-a-spectra-adapter": lambda g: one(save_safetensors({"w": torch.ones(4)}), 415, "metadata 'format' is None"),
    "format-version-2": lambda g: one(meta("format_version", "2")(g), 422, "format_version '2' is not supported"),
    "unknown-method": lambda g: one(meta("method", "lora")(g), 422, "unknown method 'lora'"),
    "unknown-norm": lambda g: one(meta("norm", "forward")(g), 422, "unknown DCT norm 'forward'"),
    "modules-not-json": lambda g: one(with_modules_text(g, "{oops"), 422, "metadata field 'modules' is not valid JSON"),
    "modules-not-an-object": lambda g: one(
        with_modules_text(g, "[1, 2]"), 422, "'modules' must be a non-empty JSON object"
    ),
    "modules-nested-20k-deep": lambda g: one(  # was 500 (RecursionError)
        with_modules_text(g, "[" * 20_000), 422, "'modules' is not valid JSON (nested too deeply)"
    ),
    "modules-5000-digit-number": lambda g: one(  # was 500 (ValueError: int digits limit)
        with_modules_text(g, "1" * 5000), 422, "'modules' is not valid JSON (a number has too many digits)"
    ),
    "extra-not-an-object": lambda g: one(meta("extra", "[1]")(g), 422, "metadata 'extra' must be a JSON object"),
    "seed-not-an-integer": lambda g: one(meta("seed", "abc")(g), 422, "metadata 'seed' 'abc' is not an integer"),
    "seed-beyond-torch": lambda g: one(  # was accepted; its PEFT download then failed with a 500
        meta("seed", str(1 << 70))(g), 422, "outside the range torch accepts"
    ),
    "scaling-nan": lambda g: one(
        with_modules_text(g, json.dumps(g.modules).replace("300.0", "NaN", 1)), 422, "scaling nan is not finite"
    ),
    "scaling-infinity": lambda g: one(
        with_modules_text(g, json.dumps(g.modules).replace("300.0", "-Infinity", 1)), 422, "scaling -inf is not finite"
    ),
    "scaling-beyond-float": lambda g: one(  # was 500 (OverflowError)
        set_module("scaling", 10**400)(g), 422, "is too large to be a float"
    ),
    "scaling-a-string": lambda g: one(set_module("scaling", "big")(g), 422, "'scaling' must be a number"),
    # shapes and sizes
    "shape-gigantic": lambda g: one(set_module("shape", [1 << 40, 1 << 40])(g), 422, "'shape' must be [d_out, d_in]"),
    "shape-negative": lambda g: one(set_module("shape", [-64, 64])(g), 422, "'shape' must be [d_out, d_in]"),
    "shape-of-another-model": lambda g: one(
        set_module("shape", [128, 64])(g), 422, "has shape [128, 64] (d_out, d_in) in the adapter but [64, 64]"
    ),
    "n-bigger-than-the-layer": lambda g: one(
        _more_coefficients_than_the_layer_has(g), 422, "n=2049 is out of range [1, 2048]"
    ),
    "module-not-in-the-base": lambda g: one(
        rename_q(g), 422, "'model.layers.9.self_attn.q_proj' does not exist in the base model"
    ),
    # dtypes
    "coefficients-float64": lambda g: one(
        set_tensor(coef, lambda c: c.double())(g), 422, "dtype torch.float64; supported"
    ),
    "coefficients-int64": lambda g: one(set_tensor(coef, lambda c: c.long())(g), 422, "dtype torch.int64; supported"),
    "coefficients-bool": lambda g: one(set_tensor(coef, lambda c: c > 0)(g), 422, "dtype torch.bool; supported"),
    "locations-float32": lambda g: one(
        set_tensor(locations, lambda loc: loc.float())(g), 422, "dtype torch.float32; expected an integer type"
    ),
    "locations-uint8": lambda g: one(
        set_tensor(locations, lambda loc: loc.to(torch.uint8))(g), 422, "expected an integer type (int16, int32"
    ),
    # values
    "coefficient-nan": lambda g: one(
        set_tensor(coef, lambda c: c.index_fill(0, torch.tensor([3]), math.nan))(g), 422, "coefficient 3 is nan"
    ),
    "coefficient-inf": lambda g: one(
        set_tensor(coef, lambda c: c.index_fill(0, torch.tensor([5]), -math.inf))(g), 422, "coefficient 5 is -inf"
    ),
    "coefficient-fp16-overflow": lambda g: one(set_tensor(coef, lambda c: (c * 1e6).half())(g), 422, "(not finite)"),
    "location-row-out-of-range": lambda g: one(
        set_tensor(locations, lambda loc: _set(loc, (0, 2), 64))(g), 422, "location 2 has row 64, outside [0, 63]"
    ),
    "location-column-out-of-range": lambda g: one(
        set_tensor(locations, lambda loc: _set(loc, (1, 4), 32767))(g), 422, "location 4 has column 32767, outside"
    ),
    "location-negative": lambda g: one(
        set_tensor(locations, lambda loc: _set(loc, (0, 0), -1))(g), 422, "location 0 has row -1"
    ),
    "location-duplicated": lambda g: one(set_tensor(locations, _duplicate_location)(g), 422, "appears more than once"),
    # tensors that do not fit together
    "fewer-locations-than-coefficients": lambda g: one(
        set_tensor(locations, lambda loc: loc[:, :-1].clone())(g), 422, "40 coefficients but locations of shape [39]"
    ),
    "locations-not-2-rows": lambda g: one(
        set_tensor(locations, lambda loc: torch.cat([loc, loc[:1]]))(g), 422, "must have shape (2, n), got [3, 40]"
    ),
    "coefficients-2d": lambda g: one(set_tensor(coef, lambda c: c.reshape(2, 20))(g), 422, "coefficients must be 1-D"),
    "coefficients-missing": lambda g: one(
        g.edit(tensors=lambda t: t.pop(f"coef.{Q}")), 422, f"tensor 'coef.{Q}' is missing"
    ),
    "locations-missing": lambda g: one(
        set_module("locations", "loc.99")(g), 422, "locations tensor 'loc.99' is missing"
    ),
    "unknown-tensor": lambda g: one(
        g.edit(tensors=lambda t: t.__setitem__("payload", torch.zeros(8))), 422, "unexpected tensors ['payload']"
    ),
    # PEFT directories
    "peft-config-not-json": lambda g: Case(_peft(b"{not json"), 422, "adapter_config.json is not valid JSON"),
    "peft-config-not-an-object": lambda g: Case(_peft(b"[]"), 422, "adapter_config.json must be a JSON object"),
    "peft-config-nested-20k-deep": lambda g: Case(  # was 500 (RecursionError)
        _peft(b"[" * 20_000), 422, "adapter_config.json is not valid JSON (nested too deeply)"
    ),
    "peft-config-5000-digit-number": lambda g: Case(  # was 500 (ValueError)
        _peft(b'{"peft_type": "FOURIERFT", "n_frequency": ' + b"9" * 5000 + b"}"), 422, "a number has too many digits"
    ),
    "peft-lora": lambda g: Case(
        _peft(_peft_config(peft_type="LORA")), 415, "peft_type 'LORA'; accepted PEFT types: FOURIERFT"
    ),
    "peft-no-type": lambda g: Case(_peft(b"{}"), 415, "peft_type None; accepted PEFT types"),
    "peft-target-module-not-in-the-base": lambda g: Case(  # was accepted (target_modules was ignored)
        _peft(_peft_config(target_modules=["q_proj", "gate_attn"])), 422, "target module 'gate_attn' does not exist"
    ),
    "peft-target-regex-matching-nothing": lambda g: Case(  # was accepted
        _peft(_peft_config(target_modules=r".*\.wq")), 422, "matches no linear layer of the base model"
    ),
    "peft-weights-not-targeted": lambda g: Case(  # was accepted: PEFT would drop these weights
        _peft(_peft_config(target_modules=["v_proj"])), 422, "which target_modules ['v_proj'] does not select"
    ),
    "peft-weights-module-not-in-the-base": lambda g: Case(
        _peft(_peft_config(), {"base_model.model.model.layers.0.nope.fourierft_spectrum": torch.ones(4)}),
        422,
        "'model.layers.0.nope' does not exist in the base model",
    ),
    "peft-unknown-tensor": lambda g: Case(
        _peft(_peft_config(), {"lora_A": torch.ones(4)}), 422, "unexpected tensor 'lora_A'"
    ),
    "peft-no-tensors": lambda g: Case(_peft(_peft_config(), {}), 422, "holds no tensors"),
    "peft-n-frequency-mismatch": lambda g: Case(
        _peft(_peft_config(n_frequency=5)), 422, "spectrum has 4 coefficients but the config says n_frequency=5"
    ),
    "peft-n-frequency-bigger-than-the-layer": lambda g: Case(
        _peft(_peft_config(n_frequency=4097), {PEFT_Q: torch.ones(4097)}), 422, "n_frequency=4097 is out of range"
    ),
    "peft-n-frequency-pattern-not-an-integer": lambda g: Case(  # was 500 (ValueError in int())
        _peft(_peft_config(n_frequency_pattern={"q_proj": "many"})), 422, "['q_proj'] must be an integer"
    ),
    "peft-n-frequency-pattern-catastrophic-regex": lambda g: Case(  # hung a worker thread (re backtracking)
        _peft(_peft_config(n_frequency=5, n_frequency_pattern={"(.*.*)*y": 4})), 422, "the config says n_frequency=5"
    ),
    "peft-n-frequency-pattern-exponential-regex": lambda g: Case(  # hung: exponential even for the regex module
        _peft(_peft_config(n_frequency_pattern={"(.|.)*x": 4})), 422, "against the module names took more than 2 s"
    ),
    "peft-target-catastrophic-regex": lambda g: Case(  # would hang if matched with re
        _peft(_peft_config(target_modules="(.*.*)*y")), 422, "matches no linear layer"
    ),
    "peft-scaling-beyond-float": lambda g: Case(  # was 500 (OverflowError)
        _peft(_peft_config(scaling=10**400)), 422, "'scaling' is too large to be a float"
    ),
    "peft-scaling-nan": lambda g: Case(_peft(_peft_config(scaling=math.nan)), 422, "scaling nan is not finite"),
    "peft-seed-beyond-torch": lambda g: Case(  # was 500 (torch: Overflow when unpacking long long)
        _peft(_peft_config(random_loc_seed=1 << 70)), 422, "random_loc_seed 1180591620717411303424 is outside"
    ),
    "peft-spectrum-float64": lambda g: Case(
        _peft(_peft_config(), {PEFT_Q: torch.ones(4, dtype=torch.float64)}), 422, "dtype torch.float64; supported"
    ),
    "peft-spectrum-nan": lambda g: Case(
        _peft(_peft_config(), {PEFT_Q: torch.tensor([1.0, math.nan, 1.0, 1.0])}), 422, "coefficient 1 is nan"
    ),
    "peft-config-alone": lambda g: Case([(CONFIG_NAME, _peft_config())], 422, "expected either one native"),
    # archives: uploads never take a zip, so none is ever opened (zip slip, zip bombs)
    "peft-directory-as-zip": lambda g: Case(
        [("adapter.zip", _zip(dict(_peft(_peft_config()))))], 422, "got files ['adapter.zip']; expected either"
    ),
    "zip-with-traversal-members": lambda g: Case(
        [("adapter.zip", _zip({f"../../{EVIL}": b"x", f"/tmp/{EVIL}": b"x", CONFIG_NAME: _peft_config()}))],
        422,
        "got files ['adapter.zip']",
    ),
    "zip-named-safetensors": lambda g: one(_zip(dict(_peft(_peft_config()))), 422, NOT_SAFETENSORS),
    # client file names: only the last component is ever used, and only as a name
    "filename-traversal": lambda g: Case([(f"../../{EVIL}.safetensors", bytes(64))], 422, INVALID_SAFETENSORS),
    "filename-absolute": lambda g: Case([("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")], 422, "files ['passwd']"),
    "filename-windows-traversal": lambda g: Case(
        [(f"..\\..\\{EVIL}.bin", _pickle_bytes())], 422, f"got files ['{EVIL}.bin']"
    ),
    "filename-dot-dot": lambda g: Case([("..", g.data)], 422, "every file part needs a file name"),
    # sizes
    "file-over-max-adapter-bytes": lambda g: one(
        g.data + bytes(MAX_ADAPTER_BYTES), 413, f"the limit is {MAX_ADAPTER_BYTES}"
    ),
    "body-over-the-upload-limit": lambda g: one(
        bytes(3 * MAX_ADAPTER_BYTES + (1 << 20)), 413, "request body is larger than the limit"
    ),
    # the form fields around the file
    "metadata-field-not-json": lambda g: one(g.data, 422, "metadata is not valid JSON", metadata="{oops"),
    "metadata-field-nested-deep": lambda g: one(g.data, 422, "metadata is not valid JSON", metadata="[" * 20_000),
    "metadata-field-5000-digit-number": lambda g: one(g.data, 422, "metadata is not valid JSON", metadata="1" * 5000),
}


@pytest.fixture(scope="module")
def good(shapes: dict[str, tuple[int, int]]) -> Good:
    return Good.of(shapes)


def _refused_and_unchanged(target: Target, send: Callable[[], httpx.Response], status: int, fragment: str) -> None:
    server = target.server
    before, outside = store_snapshot(server), outside_snapshot(target)
    response = send()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status
    assert fragment in message_of(response), message_of(response)
    assert store_snapshot(server) == before, "a refused upload changed the store"
    assert outside_snapshot(target) == outside, "a refused upload wrote outside the data dir"
    assert http().get(f"{server.base_url}/health").status_code == 200


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_a_bad_adapter_upload_is_refused_saying_why(target: Target, good: Good, case: str) -> None:
    bad = ADAPTER_CASES[case](good)
    _refused_and_unchanged(
        target, lambda: upload_adapter(target.server, bad.files, **bad.form), bad.status, bad.fragment
    )


def _server_rss_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_zip_bomb_is_refused_without_being_decompressed(target: Target) -> None:
    expanded = 60 << 20  # ~1000x --max-adapter-bytes, yet the archive itself is under it
    bomb = _zip_bomb(expanded)
    assert len(bomb) < MAX_ADAPTER_BYTES
    for name, fragment in (("adapter.zip", "got files ['adapter.zip']"), (WEIGHTS_NAME, NOT_SAFETENSORS)):
        rss = _server_rss_bytes(target.server)
        started = time.monotonic()
        files = [(name, bomb)] if name.endswith(".zip") else [(CONFIG_NAME, _peft_config()), (name, bomb)]
        _refused_and_unchanged(target, lambda files=files: upload_adapter(target.server, files), 422, fragment)
        assert time.monotonic() - started < 5
        assert _server_rss_bytes(target.server) - rss < expanded // 2, "the server expanded the archive"


# -- training files ----------------------------------------------------------------------------


def _jsonl(*lines: object) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


GOOD_LINE = {"prompt": "Hi", "completion": " there"}


@dataclass(frozen=True)
class TrainingCase:
    data: bytes
    status: int
    fragment: str
    name: str = "train.jsonl"
    purpose: str = "fine-tune"


T = TrainingCase
NESTED = "[" * 100_000 + "]" * 100_000
# case id -> the upload, its status and a fragment of its message ("was ..." marks the gaps fixed).
TRAINING_CASES: dict[str, TrainingCase] = {
    "pickle": T(pickle.dumps(_Exploit()), 422, "not UTF-8 text (invalid byte at line 1)"),
    "pickle-protocol-0": T(pickle.dumps([GOOD_LINE], protocol=0), 422, "line 1: invalid JSON"),
    "binary-garbage": T(bytes(range(256)) * 8, 422, "not UTF-8 text"),
    "utf-16": T(json.dumps(GOOD_LINE).encode("utf-16"), 422, "not UTF-8 text"),
    "nul-bytes": T(bytes(1000), 422, "line 1: invalid JSON"),
    "nan-literal": T(  # was accepted (Python's json reads NaN)
        b'{"prompt": "a", "completion": "b", "score": NaN}\n', 422, "line 1: invalid JSON (NaN is not a JSON value)"
    ),
    "infinity-literal": T(  # was accepted
        _jsonl(GOOD_LINE, '{"prompt": "a", "completion": "b", "score": -Infinity}'),
        422,
        "line 2: invalid JSON (-Infinity is not a JSON value)",
    ),
    "nested-100k-deep": T(_jsonl(GOOD_LINE, NESTED), 422, "line 2: invalid JSON (nested too deeply)"),
    "nested-deep-inside-a-valid-line": T(
        _jsonl('{"prompt": "a", "completion": "b", "x": ' + NESTED + "}"),
        422,
        "line 1: invalid JSON (nested too deeply)",
    ),
    "5000-digit-number": T(  # was 500 (ValueError: int digits limit)
        _jsonl('{"prompt": "a", "completion": "b", "n": ' + "7" * 5000 + "}"),
        422,
        "line 1: invalid JSON (a number has too many digits)",
    ),
    "lone-surrogate": T(  # was 500 (TypeError from the tokenizer)
        _jsonl('{"prompt": "\\ud800", "completion": "b"}'), 422, "line 1: field 'prompt' holds an unpaired surrogate"
    ),
    "gigantic-line": T(_jsonl({"prompt": "a", "completion": "word " * 12_000}), 422, "tokens; the limit is 4096"),
    "gigantic-line-over-the-size-limit": T(
        _jsonl({"prompt": "a", "completion": "x" * MAX_TRAINING_FILE_BYTES}), 413, f"limit is {MAX_TRAINING_FILE_BYTES}"
    ),
    "not-objects": T(_jsonl([1, 2], "null", '"text"'), 422, "line 1: not a JSON object"),
    "empty": T(b"", 422, "has no examples (it is empty or only blank lines)"),
    "blank-lines-only": T(b"\n \n\t\n", 422, "has no examples"),
    "filename-traversal": T(b"\x80\x04not text", 422, "not UTF-8 text", name=f"../../{EVIL}.jsonl"),
    "filename-absolute": T(b"root:x:0:0::/root:/bin/sh\n", 422, "line 1: invalid JSON", name="/etc/passwd"),
    "filename-dot-dot": T(_jsonl(GOOD_LINE), 422, "the file part needs a file name", name=".."),
    "wrong-purpose": T(_jsonl(GOOD_LINE), 422, "purpose 'assistants' is not supported", purpose="assistants"),
    "purpose-traversal": T(_jsonl(GOOD_LINE), 422, "is not supported", purpose="../../fine-tune"),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_a_bad_training_file_is_refused_saying_why(target: Target, case: str) -> None:
    bad = TRAINING_CASES[case]
    _refused_and_unchanged(
        target, lambda: upload_training_file(target.server, bad.name, bad.data, bad.purpose), bad.status, bad.fragment
    )


# -- names that try to leave the data dir, on files that are otherwise fine ----------------------


def test_traversal_file_names_on_valid_uploads_keep_only_the_last_component(target: Target, good: Good) -> None:
    server, outside = target.server, outside_snapshot(target)
    names = (f"../../{EVIL}.safetensors", f"/tmp/{EVIL}.safetensors", f"..\\..\\{EVIL}.safetensors")
    for index, name in enumerate(names):
        response = http().post(
            f"{server.base_url}/v1/adapters",
            data={"adapter_id": f"bad/traversal{index}"},
            files={"file": (name, good.data)},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        assert http().delete(f"{server.base_url}/v1/adapters/bad/traversal{index}").status_code == 200
    for name in (f"../../{EVIL}.jsonl", f"/tmp/{EVIL}.jsonl", f"..\\..\\{EVIL}.jsonl", f"C:{EVIL}.jsonl"):
        response = upload_training_file(server, name, _jsonl(GOOD_LINE))
        assert response.status_code == 200, response.text
        assert response.json()["filename"] == f"{EVIL}.jsonl"
        assert http().delete(f"{server.base_url}/v1/files/{response.json()['id']}").status_code == 200
    assert outside_snapshot(target) == outside
    assert not list(Path("/tmp").glob(f"{EVIL}*"))


def test_after_the_whole_corpus_the_server_is_healthy_and_generates_as_before(target: Target) -> None:
    server = target.server
    assert http().get(f"{server.base_url}/health").status_code == 200
    for adapter, tokens in target.reference.items():
        assert greedy(server, adapter) == tokens, adapter
    log = server.log_path.read_text(errors="replace")
    assert f"{EVIL}: a pickle was loaded" not in log
    assert "unhandled error" not in log and '" 500' not in log, server.log_tail()


# -- a blob damaged on disk -----------------------------------------------------------------------


def _blob(server: Server, sha256: str) -> Path:
    return data_dir_of(server) / "adapters" / "blobs" / sha256[:2] / sha256


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _assert_broken(server: Server, adapter_id: str) -> None:
    shown = http().get(f"{server.base_url}/v1/adapters/{adapter_id}").json()
    assert shown["status"] == "broken" and "fails its sha256 check" in shown["broken_reason"], shown
    response = generate(server, adapter_id)
    assert response.status_code == 409, response.text
    message = message_of(response)
    assert f"adapter {adapter_id}@1 is broken" in message and "fails its sha256 check" in message, message
    assert "upload it again" in message
    assert adapter_id not in [card["id"] for card in http().get(f"{server.base_url}/v1/models").json()["data"]]
    assert http().get(f"{server.base_url}/v1/adapters/{adapter_id}/download").status_code == 409


@pytest.mark.timeout(180)
def test_a_blob_damaged_on_disk_is_never_served_and_stays_broken_across_a_kill_9(
    tiny_llama_dir: Path, shapes: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    from tests.http_fixtures import start_server, stop_server

    files = {
        name: native.to_bytes(random_adapter(shapes, seed)) for name, seed in (("cold", 1), ("warm", 2), ("other", 3))
    }
    server = start_server(tiny_llama_dir, tmp_path, {})
    try:
        sha = {}
        for adapter_id, data in files.items():
            response = upload_adapter(server, [("adapter.safetensors", data)], adapter_id=adapter_id)
            assert response.status_code == 201 and response.json()["pinned"] is False, response.text
            sha[adapter_id] = response.json()["sha256"]
        reference = {adapter: greedy(server, adapter) for adapter in (None, "warm", "other")}
        # "cold" was never used: not resident, so its next use reads the damaged blob. "warm" is resident.
        for adapter_id in ("cold", "warm"):
            _flip_one_byte(_blob(server, sha[adapter_id]))

        response = generate(server, "cold")
        assert response.status_code == 409, response.text
        _assert_broken(server, "cold")
        # The bank holds warm's verified coefficients, so it still serves exactly what it served before;
        # its download re-checks the blob, which marks it broken from then on.
        assert greedy(server, "warm") == reference["warm"]
        assert http().get(f"{server.base_url}/v1/adapters/warm/download").status_code == 409
        _assert_broken(server, "warm")
        assert greedy(server, "other") == reference["other"] and greedy(server, None) == reference[None]
        assert http().get(f"{server.base_url}/health").status_code == 200

        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        server = start_server(tiny_llama_dir, tmp_path, {})
        log = server.log_path.read_text(errors="replace")
        for adapter_id in ("cold", "warm"):
            assert f"adapter broken id={adapter_id} version=1" in log
            _assert_broken(server, adapter_id)
        assert greedy(server, "other") == reference["other"] and greedy(server, None) == reference[None]

        # Uploading the same bytes again is the repair the 409 asks for: the damaged blob is rewritten.
        response = upload_adapter(server, [("adapter.safetensors", files["cold"])], adapter_id="cold")
        assert response.status_code == 201 and response.json()["version"] == 2, response.text
        assert hashlib.sha256(_blob(server, sha["cold"]).read_bytes()).hexdigest() == sha["cold"]
        assert generate(server, "cold").status_code == 200
        assert http().get(f"{server.base_url}/health").status_code == 200
    finally:
        stop_server(server)
