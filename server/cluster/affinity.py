"""Which adapter a request asks for, read from its body: the key Ray Serve's multiplexed routing groups on.

Generation bodies name adapters in three ways: TGI/LoRAX ``parameters.adapter_id`` or a blend
``parameters.adapters`` (``{"a": 0.7, "b": 0.3}``), OpenAI ``model`` (an adapter id, or the base model's name
for none) or the ``adapters`` blend extension. A blend is keyed by its first adapter: the replica holding it
already has a share of the bank warm, and one key per blend would scatter blends sharing adapters. No adapter
(the base model) means no key: any replica serves it equally well, so Ray balances it by load alone.
Nothing here validates: a malformed body goes to some replica, whose app answers the 4xx.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


def _first_of_blend(blend: Any) -> str | None:
    if isinstance(blend, dict):
        return next((name for name in blend if isinstance(name, str) and name), None)
    return None


def adapter_key(body: bytes, base_model: str) -> str | None:
    """The adapter id a request body asks for, or None (base model, not a JSON object)."""
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    parameters = payload.get("parameters")
    if isinstance(parameters, dict):
        adapter_id = parameters.get("adapter_id")
        if isinstance(adapter_id, str) and adapter_id:
            return adapter_id
        return _first_of_blend(parameters.get("adapters"))
    model = payload.get("model")
    if isinstance(model, str) and model and model != base_model:
        return model
    return _first_of_blend(payload.get("adapters"))


@dataclass
class AffinityProbe:
    """Whether a request's adapter was already in its replica's routing set: a hit, unless Ray's multiplexed
    loader ran for it (``record_miss``). The loader runs in the request's task or a copy of its context, so a
    mutable object, not the variable itself, carries the answer back. (Here, not in replica.py: Ray pickles a
    deployment class by value, and a ContextVar does not pickle.)"""

    hit: bool = True


_PROBE: ContextVar[AffinityProbe] = ContextVar("spectra_affinity_probe")


def start_probe() -> AffinityProbe:
    probe = AffinityProbe()
    _PROBE.set(probe)
    return probe


def record_miss() -> None:
    probe = _PROBE.get(None)
    if probe is not None:
        probe.hit = False
