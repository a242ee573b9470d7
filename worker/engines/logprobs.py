"""vLLM's per-token logprobs → the result's OpenAI-like ``logprobs`` list.

vLLM gives, per generated position, a dict token id → ``Logprob(logprob, rank,
decoded_token)`` holding the sampled token and the ``top_logprobs`` most likely ones (the
sampled token counted once when it is among them), as a list or as ``FlatLogprobs`` (which
indexes like one). Which entries are the top ones is read from their ranks, not from the
dict's order, so the sampled token is listed among the top ones only when it is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MIN_LOGPROB = -9999.0
"""Stands for minus infinity (JSON has no infinities); OpenAI and vLLM's server use it too."""


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


def _text(token_id: int, entry: Any, tokenizer: Any | None) -> str | None:
    decoded = getattr(entry, "decoded_token", None) if entry is not None else None
    if decoded is not None:
        return str(decoded)
    if tokenizer is None:
        return None
    return str(tokenizer.decode([token_id]))


def _candidate(token_id: int, entry: Any, tokenizer: Any | None) -> dict[str, Any]:
    return {"token": _text(token_id, entry, tokenizer), "token_id": token_id,
            "logprob": _finite(float(entry.logprob))}


def convert_logprobs(raw: Sequence[dict[int, Any] | None] | None, token_ids: list[int],
                     tokenizer: Any | None, top_logprobs: int) -> list[dict[str, Any]] | None:
    """One ``{"token", "token_id", "logprob", "top_logprobs": [...]}`` per generated token,
    or None when the request asked for no logprobs (``raw`` None). ``raw`` is
    ``CompletionOutput.logprobs`` over the whole generation, ``token_ids`` the generated
    ids and ``top_logprobs`` the request's (0: the sampled token's logprob only). A position
    vLLM gave nothing for (it never should) gets ``logprob`` -9999 and no top list."""
    if raw is None:
        return None
    out: list[dict[str, Any]] = []
    for i, token_id in enumerate(token_ids):
        position = raw[i] if i < len(raw) else None
        entry = position.get(token_id) if position else None
        if entry is None:
            out.append({"token": _text(token_id, None, tokenizer), "token_id": token_id,
                        "logprob": MIN_LOGPROB, "top_logprobs": []})
            continue
        assert position is not None
        ranked = sorted(
            ((tid, e) for tid, e in position.items()
             if e.rank is not None and 1 <= e.rank <= top_logprobs),
            key=lambda item: int(item[1].rank))
        out.append({**_candidate(token_id, entry, tokenizer),
                    "top_logprobs": [_candidate(tid, e, tokenizer) for tid, e in ranked]})
    return out
