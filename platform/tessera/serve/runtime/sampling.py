"""Choosing the next token and reporting log-probabilities: pure functions of logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# OpenAI's bound on stop sequences, and one on their length: the engine holds back and searches
# the end of every row's text for each of them on every step.
MAX_STOPS = 4
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation (OpenAI's parameters, already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens and their logprobs


def choice_generator(seed: int | None, choice: int, device: torch.device) -> torch.Generator | None:
    """A generator per choice, so a seeded request samples the same tokens however it is batched."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + choice) % (2**63))
    return generator


def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (nucleus sampling)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # A token stays if the mass before it is still below top_p: the top token always stays.
    keep_sorted = (cumulative - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = probs * keep
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int | None:
    """One token from one row of finite logits, or None when the row cannot be sampled.

    The logits are shifted so their maximum is 0 *before* dividing by the temperature: every
    scaled value is then <= 0 (at worst -inf, whose probability is 0) and the maximum stays 0, so
    no accepted temperature, however small (1e-40, 5e-324), can make a NaN or an infinite sum.
    """
    if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(top_p) and 0 < top_p <= 1):
        return None
    # float64: a temperature is a Python float, and e.g. 5e-324 would round to 0 in float32.
    shifted = logits.double() - logits.max().double()
    probs = filter_top_p(torch.softmax(shifted / temperature, dim=-1), top_p)
    if not torch.isfinite(probs).all():
        return None
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """One token per row of `logits` (rows, vocab), each row by its own parameters.

    Rows are independent: a row whose logits are not all finite (an adapter whose weights
    overflow) or that cannot be sampled gets None and no report, and the others are unaffected.
    """
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    chosen: list[int | None] = logits.argmax(dim=-1).tolist()
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if not finite[row]:
            chosen[row] = None
        elif not row_params.greedy:
            chosen[row] = sample_row(logits[row], row_params.temperature, row_params.top_p, generator)
    reports: list[TokenLogprob | None] = [None] * len(params)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None and chosen[row] is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[wanted], dim=-1)
        k = max(params[row].logprobs or 0 for row in wanted)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for i, row in enumerate(wanted):
            count = params[row].logprobs or 0
            top = tuple(zip(top_ids[i, :count].tolist(), top_values[i, :count].tolist(), strict=True)) if count else ()
            reports[row] = TokenLogprob(chosen[row], float(logprobs[i, chosen[row]]), top)
    return chosen, reports
