"""The engine options both bench commands take (``python -m bench`` and ``python -m bench
latency``), declared once, and the :class:`~bench.config.EngineConfig` built from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from bench.config import EngineConfig

Model = Annotated[str, typer.Option(help="model directory or name; default: the generated "
                                    "tiny model (it has a tokenizer)")]
LoadFormat = Annotated[str, typer.Option(help="vLLM load format (dummy = random weights)")]
SkipTokenizerInit = Annotated[bool, typer.Option(
    help="no tokenizer: prompts and outputs are token ids (the latency command leaves the "
         "gateway out)")]
MaxNumSeqs = Annotated[int, typer.Option(help="engine batch slots")]
MaxNumBatchedTokens = Annotated[int, typer.Option()]
MaxModelLen = Annotated[int, typer.Option()]
GpuMemoryUtilization = Annotated[float, typer.Option()]
EnforceEager = Annotated[bool, typer.Option()]
Headroom = Annotated[int, typer.Option(help="slotfill worker (and asyncio feeder): requests "
                                       "held waiting inside the engine beyond its slots")]

ENGINE_OPTIONS = ("model", "load_format", "skip_tokenizer_init", "max_num_seqs",
                  "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
                  "enforce_eager", "headroom")
"""The parameters above, by name: every command that declares them passes its parsed
parameters (``typer.Context.params``) to :func:`engine_config`."""


def engine_config(params: Mapping[str, Any], **more: Any) -> EngineConfig:
    """The engine configuration from a command's parsed ``params`` (the names in
    ``ENGINE_OPTIONS``) and the command's own further ``EngineConfig`` fields."""
    return EngineConfig(**{name: params[name] for name in ENGINE_OPTIONS}, **more)
