"""A reclaimed job continues where its earlier attempts stopped (their checkpoint), or starts
over where continuing would not be sound.

* :func:`restart_reason` says which request features cannot continue from a checkpoint.
* :class:`ResumePlan` is one attempt's starting point: the carried token ids and their text,
  the request narrowed to what is left, and the merge of the engine's new output after them.
  A checkpoint can hold a generation that had already ended (the worker died between the
  engine's last output and the result): its last token is EOS or a stop token, or a stop
  string lies wholly in its text; :meth:`ResumePlan.over` says so, and the attempt finishes
  at once with the checkpointed output (``stop``) instead of generating past the end.
* :class:`Seam` checks stop strings across the seam: the engine only ever sees the new text,
  so a stop string that begins in the carried text and ends in the new one is found here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from producer.schema import JobRequest
from worker.engines.base import DeltaSink, Generation

RESTARTS: dict[str, str] = {
    "structured": "structured output: the grammar's state at the seam cannot be carried",
    "logprobs": "logprobs: the carried tokens' logprobs are not checkpointed",
    "seed": "seed: a seeded job reruns whole, so its output stays reproducible",
    "penalties": "presence/frequency penalties count generated tokens, and carried ones "
                 "would become prompt",
}
"""Why a job with each feature starts over (PROTOCOL.md, "Resume or restart")."""

NO_CHECKPOINT = "no checkpoint: the earlier attempt wrote none, or checkpoints are off"


def ends_with_stop(req: JobRequest, ids: list[int], eos_ids: frozenset[int]) -> bool:
    """The carried ids end with a token that ended the generation: one of the request's
    ``stop_token_ids`` (honoured once ``min_tokens`` are out), or the model's EOS unless
    ``ignore_eos``."""
    if not ids or len(ids) < req.min_tokens:
        return False
    last = ids[-1]
    return last in (req.stop_token_ids or ()) or (not req.ignore_eos and last in eos_ids)


def stop_strings(req: JobRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or ())


def restart_reason(req: JobRequest) -> str | None:
    """Why ``req`` must start over on a new attempt; None: it may continue."""
    rf = req.response_format
    if (rf is not None and rf.type != "text") or req.structured_outputs is not None:
        return RESTARTS["structured"]
    if req.logprobs:
        return RESTARTS["logprobs"]
    if req.seed is not None:
        return RESTARTS["seed"]
    if req.presence_penalty or req.frequency_penalty:
        return RESTARTS["penalties"]
    return None


@dataclass
class ResumePlan:
    """Where one attempt starts: ``ids`` (and their ``text``) carried from earlier attempts."""

    request: JobRequest
    ids: list[int]
    text: str
    """The carried ids' text (without a final stop token's, as the engine leaves it out)."""
    stopped: bool = False
    """The carried ids end with EOS or a stop token (:func:`ends_with_stop`)."""

    def over(self) -> tuple[str, int | None] | None:
        """The carried output already ended: (finish reason, where a stop string cuts the
        text or None); None: generation goes on."""
        if self.stopped:
            return "stop", None
        hits = [i for s in stop_strings(self.request) if s and (i := self.text.find(s)) >= 0]
        if hits:
            return "stop", min(hits)
        if self.left == 0:
            return "length", None
        return None

    @property
    def at(self) -> int:
        return len(self.ids)

    @property
    def left(self) -> int:
        """Tokens still to generate."""
        return max(0, self.request.max_tokens - self.at)

    def narrowed(self) -> JobRequest:
        """The request for the rest: max_tokens and min_tokens less what is carried."""
        req = self.request
        return req.model_copy(update={"max_tokens": self.left,
                                      "min_tokens": max(0, req.min_tokens - self.at)})

    def merge(self, gen: Generation, seam: Seam | None, cut: int | None = None) -> Generation:
        """The whole job's generation: the carried tokens, then the new ones. ``cut``: a stop
        string in the carried text ends it there."""
        text = self.text + gen.text
        out = replace(gen, text=text, token_ids=self.ids + gen.token_ids,
                      completion_tokens=self.at + gen.completion_tokens)
        cut = seam.cut if seam is not None and seam.cut is not None else cut
        if cut is not None:
            out.text, out.finish_reason, out.aborted = text[:cut], "stop", False
        return out


@dataclass
class Seam:
    """Stop strings across the seam. While the new text is shorter than the longest stop
    string, the new output is held back from the sink; a stop string that starts in the
    carried text and ends in the new text ends the job there (``cut``)."""

    carried: str
    stops: list[str]
    sink: DeltaSink | None
    abort: Callable[[], None]
    cut: int | None = None
    """Length of the result text when a stop string crossed the seam."""
    _new: str = ""
    _held: list[tuple[str, list[int]]] = field(default_factory=list)
    _open: bool = True

    def __post_init__(self) -> None:
        longest = max((len(s) for s in self.stops), default=0)
        self._tail = self.carried[len(self.carried) - max(0, longest - 1):] if longest > 1 else ""
        self._open = bool(self._tail)
        self._width = longest - 1

    def feed(self, text: str, ids: list[int]) -> None:
        if not self._open:
            if self.sink is not None and self.cut is None:
                self.sink(text, ids)
            return
        self._new += text
        self._held.append((text, ids))
        window = self._tail + self._new
        starts = [window.find(s) for s in self.stops]
        hits = [p for p, s in zip(starts, self.stops, strict=True)
                if 0 <= p < len(self._tail) and p + len(s) > len(self._tail)]
        if hits:
            self.cut = len(self.carried) - len(self._tail) + min(hits)
            self._open = False
            self._held.clear()
            self.abort()
        elif len(self._new) >= self._width:
            self.close()

    def close(self) -> None:
        """The seam is passed (or the generation ended): release what was held."""
        self._open = False
        held, self._held = self._held, []
        if self.sink is not None and self.cut is None:
            for text, ids in held:
                self.sink(text, ids)
