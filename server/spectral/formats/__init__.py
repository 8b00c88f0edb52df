"""Adapter files in and out: the native single-file format, PEFT FourierFT directories, the checks every
adapter passes before it is stored or served, and uploads and downloads (docs/adapter-format.md).

Parsing and validation need torch and the served model's layer shapes, so they live here, next to the
in-memory adapter they produce; ``adapters_store`` only keeps the bytes they accept."""
