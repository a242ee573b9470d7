"""The seeded workload every mode runs: prompts and exact output lengths.

Token-id prompts by default (no tokenizer needed: ``--skip-tokenizer-init``). With
``--text``, prompts are text cut from the model directory's ``corpus.txt.gz``
(bench/gpu/make_text_model.py): each is a window of the tokenized corpus at a seeded
offset, decoded back to text, so the engine tokenizes (and detokenizes) as for a real job.
"""

from __future__ import annotations

import functools
import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import WorkloadConfig


@dataclass(frozen=True)
class Request:
    index: int
    prompt: list[int] | str
    """Token ids (exact prompt length), or text (``--text``)."""
    max_tokens: int
    """With ``ignore_eos`` the request produces exactly this many tokens."""
    prompt_tokens: int = -1
    """Text prompts: their length in the model's tokens (``<s>`` included); -1 for ids."""

    @property
    def n_prompt(self) -> int:
        return len(self.prompt) if isinstance(self.prompt, list) else self.prompt_tokens

    def job(self) -> dict[str, object]:
        """The request as a slotfill job body (temperature etc. at their defaults, as in
        every other mode)."""
        return {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True}


def make_workload(cfg: WorkloadConfig, vocab_size: int, model_path: str = "") -> list[Request]:
    """The requests; text prompts (``cfg.text``) need the model directory's tokenizer."""
    if cfg.max_output < cfg.min_output or cfg.min_output < 1:
        raise ValueError("need 1 <= min_output <= max_output")
    lo_prompt = cfg.min_prompt_tokens or cfg.prompt_tokens
    if not 1 <= lo_prompt <= cfg.prompt_tokens:
        raise ValueError("need 1 <= min_prompt_tokens <= prompt_tokens")
    if vocab_size <= cfg.first_token_id + 1:
        raise ValueError(f"vocab size {vocab_size} too small")
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.requests):
        n_prompt = rng.randint(lo_prompt, cfg.prompt_tokens)
        if cfg.long_share and rng.random() < cfg.long_share:  # no draw: old workloads unchanged
            n_prompt = cfg.long_prompt_tokens
        prompt = [rng.randrange(cfg.first_token_id, vocab_size) for _ in range(n_prompt)]
        out.append(Request(i, prompt, rng.randint(cfg.min_output, cfg.max_output)))
    return to_text(out, model_path, cfg.seed) if cfg.text else out


def to_text(reqs: list[Request], model_path: str, seed: int) -> list[Request]:
    """Each request's prompt becomes corpus text of about its length in tokens: a window of
    ``len - 1`` tokens (the tokenizer adds ``<s>``) at a seeded offset, decoded. Decoding
    and encoding again may merge a token or two at the edges: the exact count is kept."""
    tok = _tokenizer(model_path)
    corpus = _corpus_ids(model_path)
    rng = random.Random(f"text-{seed}")
    windows = []
    for q in reqs:
        n = max(1, len(q.prompt) - 1)
        if n >= len(corpus):
            raise ValueError(f"corpus of {len(corpus)} tokens is too short for {n}-token "
                             "prompts")
        at = rng.randrange(0, len(corpus) - n)
        windows.append(corpus[at:at + n])
    texts = tok.decode_batch(windows, skip_special_tokens=True)
    counts = [len(e.ids) for e in tok.encode_batch(texts)]
    return [Request(q.index, text, q.max_tokens, n)
            for q, text, n in zip(reqs, texts, counts, strict=True)]


def corpus_text(model_path: str) -> str:
    path = Path(model_path) / "corpus.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: text prompts are cut from it "
                                "(bench/gpu/make_text_model.py writes it)")
    return gzip.decompress(path.read_bytes()).decode()


@functools.cache
def _corpus_ids(model_path: str) -> list[int]:
    ids: list[int] = _tokenizer(model_path).encode(corpus_text(model_path),
                                                   add_special_tokens=False).ids
    return ids


@functools.cache
def _tokenizer(model_path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))


def total_output_tokens(reqs: list[Request]) -> int:
    return sum(r.max_tokens for r in reqs)


def total_prompt_tokens(reqs: list[Request]) -> int:
    return sum(r.n_prompt for r in reqs)
