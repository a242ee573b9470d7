"""The seeded workload every mode runs: token-id prompts and exact output lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.config import WorkloadConfig


@dataclass(frozen=True)
class Request:
    index: int
    prompt: list[int]
    """Token ids: exact prompt length, and no tokenizer needed (``--skip-tokenizer-init``)."""
    max_tokens: int
    """With ``ignore_eos`` the request produces exactly this many tokens."""

    def job(self) -> dict[str, object]:
        """The request as a slotfill job body (temperature etc. at their defaults, as in
        every other mode)."""
        return {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True}


def make_workload(cfg: WorkloadConfig, vocab_size: int) -> list[Request]:
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
    return out


def total_output_tokens(reqs: list[Request]) -> int:
    return sum(r.max_tokens for r in reqs)
