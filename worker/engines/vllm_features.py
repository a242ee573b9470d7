"""Request features that need vLLM objects: structured output constraints and LoRA adapters.

Imports of vLLM happen inside the functions, so the module loads without vLLM (the sim
engine, the tests of the pure parts). Where this vLLM lacks an API, the job fails with a
typed error naming what is missing; the worker never crashes on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from producer.errors import ErrorCode, InvalidRequest
from producer.features import ADAPTER_NAME
from producer.schema import JobRequest

log = logging.getLogger("slotfill.worker")


def constraint(req: JobRequest) -> dict[str, Any] | None:
    """The request's structured output constraint as vLLM's ``StructuredOutputsParams``
    fields, or None for unconstrained text."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type == "json_object":
        return {"json_object": True}
    if fmt is not None and fmt.type == "json_schema":
        return {"json": fmt.json_schema.json_schema}
    if so is None:
        return None
    if so.json_schema is not None:
        return {"json": so.json_schema}
    if so.regex is not None:
        return {"regex": so.regex}
    return {"choice": list(so.choice or [])}


def structured_outputs_kwargs(req: JobRequest) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for the request's constraint (empty: none).

    vLLM ≥ 0.11 takes ``structured_outputs=StructuredOutputsParams(...)``; older releases
    took ``guided_decoding=GuidedDecodingParams(...)`` with ``json_object`` the same."""
    fields = constraint(req)
    if fields is None:
        return {}
    from vllm import sampling_params as sp

    params_cls = getattr(sp, "StructuredOutputsParams", None)
    if params_cls is not None:
        return {"structured_outputs": params_cls(**fields)}
    legacy = getattr(sp, "GuidedDecodingParams", None)
    if legacy is not None:
        return {"guided_decoding": legacy(**fields)}
    raise InvalidRequest("structured output is not supported by this worker's vLLM "
                         "(no StructuredOutputsParams or GuidedDecodingParams)")


class Adapters:
    """LoRA adapters found in ``lora_dir``: one subdirectory per adapter, named after it,
    holding ``adapter_config.json`` and the weights. Each name gets an int id on first use
    that stays the same for the worker's lifetime (vLLM caches loaded adapters by id)."""

    def __init__(self, lora_dir: str, max_rank: int) -> None:
        self.root = Path(lora_dir) if lora_dir else None
        self.max_rank = max_rank
        self._ids: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def names(self) -> list[str]:
        """Adapters present now (for logs and error messages)."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if ADAPTER_NAME.match(p.name) and (p / "adapter_config.json").is_file())

    def resolve(self, name: str) -> tuple[str, int, str]:
        """(name, int id, path) of adapter ``name``; InvalidRequest ``unknown_adapter`` when
        LoRA is off, the adapter is missing, or it cannot be loaded by this worker. Checked
        here because a bad adapter reaching the engine fails inside the engine process."""
        if self.root is None:
            raise InvalidRequest(f"adapter {name!r}: this worker runs without LoRA adapters "
                                 "(no lora_dir)", ErrorCode.unknown_adapter)
        if not ADAPTER_NAME.match(name):  # never a path outside lora_dir
            raise InvalidRequest(f"adapter {name!r}: not an adapter name",
                                 ErrorCode.unknown_adapter)
        path = self.root / name
        if name not in self._ids:  # checked once, like vLLM loads it once; new names later
            self._check(name, path)
            self._ids[name] = len(self._ids) + 1
        return name, self._ids[name], str(path)

    def _check(self, name: str, path: Path) -> None:
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            known = ", ".join(self.names()) or "none"
            raise InvalidRequest(f"adapter {name!r} not found (adapters here: {known})",
                                 ErrorCode.unknown_adapter)
        try:
            config = json.loads(config_path.read_text())
            rank = int(config["r"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidRequest(f"adapter {name!r}: unreadable adapter_config.json ({e})",
                                 ErrorCode.unknown_adapter) from None
        if rank > self.max_rank:
            raise InvalidRequest(f"adapter {name!r}: rank {rank} is over this worker's "
                                 f"max_lora_rank {self.max_rank}", ErrorCode.unknown_adapter)
        if not any((path / f).is_file() for f in ("adapter_model.safetensors",
                                                   "adapter_model.bin")):
            raise InvalidRequest(f"adapter {name!r}: no adapter_model.safetensors or .bin",
                                 ErrorCode.unknown_adapter)


def lora_request(adapters: Adapters, name: str | None) -> Any:
    """vLLM's ``LoRARequest`` for adapter ``name``, or None for the base model."""
    if name is None:
        return None
    adapter_name, adapter_id, path = adapters.resolve(name)
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter_name, adapter_id, path)
