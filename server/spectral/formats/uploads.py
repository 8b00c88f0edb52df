"""Turn what a user hands us (uploaded files, a path, a stored adapter) into adapters and back.

Accepted inputs: one native ``.safetensors`` file (stored byte for byte), or the two files of
a PEFT FourierFT directory (converted to the native format, which keeps the regenerated
locations). Downloads go the other way: the stored native bytes, or a PEFT directory as a zip.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from server.spectral.adapter import SpectralAdapter
from server.spectral.formats import native
from server.spectral.formats.errors import AdapterFormatError, AdapterTooLargeError, UnsupportedAdapterTypeError
from server.spectral.formats.peft import CONFIG_NAME, WEIGHTS_NAME, from_peft, to_peft

EXPECTED_FILES = (
    f"either one native '.safetensors' adapter file, or the two files of a PEFT FourierFT directory "
    f"('{CONFIG_NAME}' and '{WEIGHTS_NAME}')"
)


@dataclass(frozen=True)
class ParsedAdapter:
    adapter: SpectralAdapter
    native_bytes: bytes
    source_format: str


def base_name(filename: str) -> str:
    """The last component of a client-supplied file name (browsers and curl may send paths); "" for none.

    ``.`` and ``..`` name no file: they come out as "" (``PurePosixPath("..").name`` is ``..``).
    """
    name = PureWindowsPath(PurePosixPath(filename).name).name
    return "" if name in (".", "..") else name


def parse_files(files: dict[str, bytes], base_shapes: dict[str, tuple[int, int]]) -> ParsedAdapter:
    """``files`` maps base file names to their bytes."""
    names = sorted(files)
    if CONFIG_NAME in files:
        if "adapter_model.bin" in files and WEIGHTS_NAME not in files:
            raise UnsupportedAdapterTypeError(
                "adapter_model.bin is a pickle and is never loaded; save the adapter with safe_serialization=True"
            )
        if set(names) != {CONFIG_NAME, WEIGHTS_NAME}:
            raise AdapterFormatError(f"got files {names}; expected {EXPECTED_FILES}")
        adapter = from_peft(files[CONFIG_NAME], files[WEIGHTS_NAME], base_shapes)
        return ParsedAdapter(adapter, native.to_bytes(adapter), "peft")
    if len(files) != 1 or not names[0].endswith(".safetensors"):
        hint = (
            " (.bin/.pt/.pkl files are pickles and are never loaded)"
            if any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in names)
            else ""
        )
        raise AdapterFormatError(f"got files {names}; expected {EXPECTED_FILES}{hint}")
    data = files[names[0]]
    return ParsedAdapter(native.from_bytes(data), data, "native")


def read_path(path: Path, base_shapes: dict[str, tuple[int, int]], max_bytes: int) -> ParsedAdapter:
    """A PEFT FourierFT directory (or its config file) or a native ``.safetensors`` file on disk."""
    directory = path if path.is_dir() else path.parent if path.name == CONFIG_NAME else None
    if directory is not None:
        candidates = [directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / "adapter_model.bin"]
        paths = [candidate for candidate in candidates if candidate.is_file()]
        if not paths:
            raise AdapterFormatError(f"{directory} is not a PEFT adapter directory: expected {EXPECTED_FILES}")
    else:
        paths = [path]
    files = {}
    for file in paths:
        size = file.stat().st_size
        if size > max_bytes:
            raise AdapterTooLargeError(f"{file.name} is {size} bytes; the limit is {max_bytes}")
        files[file.name] = file.read_bytes()
    return parse_files(files, base_shapes)


def peft_zip(adapter: SpectralAdapter, base_model_name_or_path: str) -> bytes:
    """A zip of the PEFT directory; ``PeftModel.from_pretrained`` loads it once unzipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in to_peft(adapter, base_model_name_or_path).items():
            archive.writestr(name, data)
    return buffer.getvalue()
