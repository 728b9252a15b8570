"""The generation engine: iteration-level batching of many requests over many adapters.

One engine thread owns the model. Each iteration it
  1. runs queued adapter installs and removals (so they happen between steps, never during one),
  2. admits waiting sequences whose adapter is resident, up to `max_batch_size` rows,
  3. runs one decode step for the running rows and one prefill for the newly admitted ones,
     each a single forward pass where every row uses its own adapter slot,
  4. appends one token per row, streams text out, and drops finished rows from the batch.
New requests join a running batch at the next step (continuous batching, as in Orca and vLLM);
when the engine is idle it waits up to `max_wait` for more requests to arrive before the first
prefill, so a burst is served as one batch. Rows are left-padded in one shared KV cache.

The asyncio side only submits requests and receives `ChoiceDelta` lists through each request's
`sink`; it never touches the model. Which adapter sits in which LoRA slot, and which one to evict
for a new one, is `slots.AdapterSlots`; an evicted adapter a request needs is brought back by the
`reloader` (the registry).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tessera.serve import metrics
from tessera.serve.errors import ServeError, model_not_found
from tessera.serve.runtime.lora import AdapterWeights, LoraSlots
from tessera.serve.runtime.sampling import SamplingParams, TokenLogprob, choice_generator, next_tokens
from tessera.serve.runtime.slots import AdapterSlots

log = logging.getLogger(__name__)

# Scoring a prompt (`echo`) needs the logits of every position: rows x length x vocab floats. Rows are
# prefilled in groups that keep that under this size (a row alone may exceed it).
SCORING_LOGITS_BYTES = 256 << 20


@dataclass
class ChoiceDelta:
    """What one choice produced in one step: new text, its tokens, and why it ended (if it did)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    # On a choice's first delta when the request asked for them: one entry per prompt token, the
    # first None (nothing precedes it), as OpenAI's and vLLM's `echo` return them.
    prompt_logprobs: list[TokenLogprob | None] | None = None


Sink = Callable[[list[ChoiceDelta] | BaseException | None], None]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    params: SamplingParams
    sink: Sink  # receives delta lists, then None when every choice ended, or an exception
    n: int = 1
    prompt_logprobs: int | None = None  # score the prompt too, with this many top alternatives
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the consumer (client went away); the engine drops it next step
    remaining: int = 0  # choices not finished yet (engine thread only)
    prompt_report: list[TokenLogprob | None] | None = None  # the prompt's logprobs (engine thread only)

    @property
    def metric_label(self) -> str:
        return self.adapter or metrics.BASE_LABEL


class AdapterReloader(Protocol):
    def request_reload(self, name: str) -> bool:
        """Start making an evicted adapter resident again; False when no adapter has that name."""


def visible_text(text: str, stops: tuple[str, ...], final: bool, shown: int = 0) -> tuple[str, bool]:
    """The part of `text` that may be shown now, and whether a stop string ended it.

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back
    until the next token decides it; a finished sequence shows everything left. `shown`: the
    characters already shown, which hold no stop string, so only the text after them (and a stop's
    length before, should decoding have changed them) is searched: a step's cost does not grow
    with the text, and stop strings are bounded (`sampling.MAX_STOP_CHARS`), so neither does the
    hold-back search.
    """
    longest = max((len(stop) for stop in stops), default=0)
    start = max(0, shown - longest)
    hits = [index for index in (text.find(stop, start) for stop in stops if stop) if index >= 0]
    if hits:
        return text[: min(hits)], True
    if final:
        return text, False
    hold = max((held_prefix(text, stop) for stop in stops), default=0)
    visible = text[: len(text) - hold]
    return visible.rstrip("\ufffd"), False


def held_prefix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop` (0 if none): only the
    positions where `stop`'s first character occurs are tried."""
    if len(stop) < 2:
        return 0
    tail = text[-(len(stop) - 1):]
    at = tail.find(stop[0])
    while at >= 0:
        if stop.startswith(tail[at:]):
            return len(tail) - at
        at = tail.find(stop[0], at + 1)
    return 0


@dataclass
class _Sequence:
    request: GenerationRequest
    index: int
    generator: torch.Generator | None
    slot: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    finish_reason: str | None = None


class _Batch:
    """Running rows: one left-padded KV cache, its attention mask, and the rows' sequences."""

    def __init__(self, sequences: list[_Sequence], cache: Any, mask: torch.Tensor) -> None:
        self.sequences = sequences
        self.cache = cache
        self.mask = mask

    def __len__(self) -> int:
        return len(self.sequences)

    @staticmethod
    def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(keys, values) for keys, values, *_ in cache]

    @staticmethod
    def _from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then cut the left padding no remaining row needs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.sum(0) > 0).int().argmax()) if mask.numel() else 0
        self.mask = mask[:, first:]
        self.cache = self._from_layers([
            (keys.index_select(0, index)[:, :, first:], values.index_select(0, index)[:, :, first:])
            for keys, values in self._layers(self.cache)
        ])
        self.sequences = [self.sequences[row] for row in rows]

    def extend(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        length = max(self.mask.shape[1], other.mask.shape[1])

        def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        self.cache = self._from_layers([
            (torch.cat([pad(k1, 2), pad(k2, 2)]), torch.cat([pad(v1, 2), pad(v2, 2)]))
            for (k1, v1), (k2, v2) in zip(self._layers(self.cache), self._layers(other.cache), strict=True)
        ])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.sequences += other.sequences


class Engine:
    """Owns the model on one thread; see the module docstring for the loop."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lora: LoraSlots,
        *,
        max_batch_size: int = 32,
        max_wait: float = 0.005,
        max_model_len: int = 2048,
        eos_token_ids: set[int] | None = None,
        reloader: AdapterReloader | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.device = lora.device
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids or set()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reloader = reloader
        self._condition = threading.Condition()
        self._inbox: list[GenerationRequest] = []
        self._commands: list[tuple[Callable[[], bool], Future]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Engine-thread state.
        self._pending: list[_Sequence] = []
        self._batch: _Batch | None = None
        self.slots = AdapterSlots(lora, on_evict=self._evicted)
        self._reloading: set[str] = set()

    # ---- public, thread-safe ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        total = len(request.prompt_ids) + request.params.max_tokens
        if total > self.max_model_len:
            raise ServeError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(request.prompt_ids)} in the prompt, {request.params.max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                status=400,
                code="context_length_exceeded",
                param="max_tokens",
            )
        with self._condition:
            self._inbox.append(request)
            self._condition.notify_all()

    def install(self, name: str, weights: AdapterWeights) -> Future:
        """Make `name` serve `weights` (a new adapter, or a new version replacing the old one).

        Runs between steps; waits for a free slot if every slot serves running rows. Rows already
        running on an older version finish on it.
        """
        return self._command(lambda: self._install(name, weights))

    def remove(self, name: str) -> Future:
        """Stop serving `name`: waiting requests for it fail with 404, running rows finish."""
        return self._command(lambda: self._remove(name))

    def fail_adapter(self, name: str, error: ServeError) -> Future:
        """Fail every waiting request for `name` (its reload failed)."""
        return self._command(lambda: self._fail_waiting(name, error))

    def resident(self) -> list[str]:
        return list(self.slots.resident)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- engine thread ----

    def _command(self, action: Callable[[], bool]) -> Future:
        future: Future = Future()
        with self._condition:
            self._commands.append((action, future))
            self._condition.notify_all()
        return future

    def _run_commands(self) -> None:
        with self._condition:
            commands, self._commands = self._commands, []
        retry = []
        for action, future in commands:
            try:
                if action():
                    future.set_result(None)
                else:
                    retry.append((action, future))
            except Exception as error:  # one failed command must not stop the engine
                log.exception("engine command failed")
                future.set_exception(error)
        if retry:
            with self._condition:
                self._commands[:0] = retry

    @staticmethod
    def _evicted(name: str, slot: int) -> None:
        metrics.ADAPTER_EVICTIONS.inc()
        log.info("evicted adapter %s from slot %d", name, slot)

    def _install(self, name: str, weights: AdapterWeights) -> bool:
        if not self.slots.install(name, weights, wanted={seq.request.adapter for seq in self._pending}):
            return False
        self._reloading.discard(name)
        metrics.ADAPTERS_RESIDENT.set(len(self.slots))
        return True

    def _remove(self, name: str) -> bool:
        if name in self.slots:
            self.slots.remove(name)
        self._reloading.discard(name)
        metrics.ADAPTERS_RESIDENT.set(len(self.slots))
        self._fail_waiting(name, model_not_found(name))
        return True

    def _fail_waiting(self, name: str, error: ServeError) -> bool:
        self._reloading.discard(name)
        failed = {id(seq.request): seq.request for seq in self._pending if seq.request.adapter == name}
        self._pending = [seq for seq in self._pending if seq.request.adapter != name]
        for request in failed.values():
            request.sink(error)
        return True

    def _admit(self) -> list[_Sequence]:
        room = self.max_batch_size - (len(self._batch) if self._batch else 0)
        admitted: list[_Sequence] = []
        waiting: list[_Sequence] = []
        failed: dict[int, GenerationRequest] = {}
        for seq in self._pending:
            name = seq.request.adapter
            if seq.request.cancelled or id(seq.request) in failed:
                continue
            if len(admitted) >= room:
                waiting.append(seq)
                continue
            if name is not None and name not in self.slots:
                if name not in self._reloading:
                    if self.reloader is None or not self.reloader.request_reload(name):
                        failed[id(seq.request)] = seq.request
                        continue
                    self._reloading.add(name)
                waiting.append(seq)
                continue
            seq.slot = self.slots.acquire(name)
            admitted.append(seq)
        for request in failed.values():
            request.sink(model_not_found(request.adapter or ""))
        self._pending = waiting
        now = time.monotonic()
        for seq in admitted:
            if seq.index == 0:
                metrics.QUEUE_TIME.labels(seq.request.metric_label).observe(now - seq.request.arrival)
        return admitted

    def _can_admit(self) -> bool:
        if self._batch is not None and len(self._batch) >= self.max_batch_size:
            return False
        return any(seq.request.adapter is None or seq.request.adapter in self.slots for seq in self._pending)

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when the engine is stopping."""
        with self._condition:
            while not (self._stopping or self._inbox or self._commands or self._batch or self._can_admit()):
                self._condition.wait()
            if self._stopping:
                return False
            if self._batch is None and self._inbox and not self._commands:
                # Idle engine, first arrivals: give a burst `max_wait` to gather into one batch.
                deadline = self._inbox[0].arrival + self.max_wait
                while len(self._inbox) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                    self._condition.wait(remaining)
            inbox, self._inbox = self._inbox, []
        for request in inbox:
            request.remaining = request.n
            for index in range(request.n):
                generator = choice_generator(request.params.seed, index, self.device)
                self._pending.append(_Sequence(request, index, generator))
        return True

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while self._wait_for_work():
            try:
                self._run_commands()
                self._step()
            except Exception:  # a failed step fails its rows, never the server
                log.exception("generation step failed")
                self._fail_batch(ServeError("generation failed; see the server log", status=500,
                                            code="internal_error"))
            metrics.RUNNING.set(len(self._batch) if self._batch else 0)
            metrics.WAITING.set(len(self._pending))

    def _fail_batch(self, error: ServeError) -> None:
        if self._batch is None:
            return
        requests = {id(seq.request): seq.request for seq in self._batch.sequences}
        for seq in self._batch.sequences:
            self.slots.release(seq.slot)
        self._batch = None
        for request in requests.values():
            request.sink(error)

    def _forward(self, sequences: list[_Sequence], input_ids, mask, positions, cache,
                 every_position: bool = False) -> torch.Tensor:
        """Logits of the last position (rows, vocab); of every position (rows, length, vocab) if asked."""
        self.lora.batch.set([seq.slot for seq in sequences], self.device)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        return output.logits if every_position else output.logits[:, -1, :]

    def _prefill(self, sequences: list[_Sequence]) -> tuple[_Batch, torch.Tensor]:
        """One forward pass over the rows' prompts; rows that score their prompt (`echo`) are
        prefilled by themselves, since only they need the logits of every position."""
        from transformers import DynamicCache

        length = max(len(seq.request.prompt_ids) for seq in sequences)
        ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            prompt = seq.request.prompt_ids
            ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        scoring = any(seq.request.prompt_logprobs is not None for seq in sequences)
        logits = self._forward(sequences, ids, mask, positions, cache, every_position=scoring)
        if scoring:
            for row, seq in enumerate(sequences):
                request = seq.request
                if request.prompt_report is None:
                    prompt = request.prompt_ids
                    request.prompt_report = prompt_logprobs(
                        logits[row, length - len(prompt): length - 1], prompt, request.prompt_logprobs or 0)
            logits = logits[:, -1, :]
        return _Batch(sequences, cache, mask), logits

    def _decode(self, batch: _Batch) -> torch.Tensor:
        last = torch.tensor([[seq.tokens[-1]] for seq in batch.sequences], dtype=torch.long, device=self.device)
        positions = batch.mask.sum(1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        return self._forward(batch.sequences, last, batch.mask, positions, batch.cache)

    def _step(self) -> None:
        admitted = self._admit()
        started = time.perf_counter()
        rows: list[_Sequence] = []
        logits: list[torch.Tensor] = []
        if self._batch is not None:
            logits.append(self._decode(self._batch))
            rows += self._batch.sequences
        plain = [seq for seq in admitted if seq.request.prompt_logprobs is None]
        scoring = [seq for seq in admitted if seq.request.prompt_logprobs is not None]
        vocab = int(self.model.config.vocab_size)
        for group in [plain, *scoring_groups(scoring, vocab)]:
            if not group:
                continue
            new_batch, new_logits = self._prefill(group)
            logits.append(new_logits)
            rows += group
            if self._batch is None:
                self._batch = new_batch
            else:
                self._batch.extend(new_batch)
        if not rows:
            return
        all_logits = torch.cat(logits)
        sampled, reports = next_tokens(
            all_logits, [seq.request.params for seq in rows], [seq.generator for seq in rows]
        )
        metrics.BATCH_ROWS.observe(len(rows))
        metrics.STEP_SECONDS.observe(time.perf_counter() - started)
        self._advance(rows, self._fail_unsampled(rows, sampled), reports)

    def _fail_unsampled(self, rows: list[_Sequence], sampled: list[int | None]) -> list[int]:
        """Fail, alone, each request with a row that could not be sampled; its rows end as cancelled.

        Rows are independent in the forward pass (own KV cache, own adapter slot), so a row whose
        scores overflowed says nothing about the others in the batch: they go on."""
        tokens = []
        for seq, token in zip(rows, sampled, strict=True):
            if token is None and not seq.request.cancelled:
                seq.request.cancelled = True
                log.warning("request %s failed alone: non-finite scores on adapter %s", seq.request.id,
                            seq.request.metric_label)
                seq.request.sink(ServeError(
                    "generation failed for this request: the model's scores were not finite (an adapter whose "
                    "weights overflow?); other requests are not affected",
                    status=500, code="generation_failed",
                ))
            tokens.append(self.pad_token_id if token is None else token)
        return tokens

    def _advance(self, rows: list[_Sequence], tokens: list[int], reports: list[TokenLogprob | None]) -> None:
        deltas: dict[int, tuple[GenerationRequest, list[ChoiceDelta]]] = {}
        keep: list[int] = []
        for row, (seq, token, report) in enumerate(zip(rows, tokens, reports, strict=True)):
            request = seq.request
            params = request.params
            # max_tokens 0 (echo): the prompt was scored; the token sampled after it is not part of the answer.
            generating = params.max_tokens > 0
            if generating:
                seq.tokens.append(token)
                if report is not None:
                    seq.logprobs.append(report)
            finish = None
            if request.cancelled:
                finish = "cancelled"
            elif not generating:
                finish = "length"
            elif token in self.eos_token_ids and not params.ignore_eos:
                finish = "stop"
            elif len(seq.tokens) >= params.max_tokens:
                finish = "length"
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            visible, stopped = visible_text(text, params.stop, final=finish is not None, shown=seq.emitted)
            if stopped:
                finish = "stop"
            delta = ChoiceDelta(
                index=seq.index,
                text=visible[seq.emitted:],
                token_ids=[token] if generating else [],
                logprobs=[report] if report is not None and generating else [],
                finish_reason=finish,
                prompt_logprobs=request.prompt_report if len(seq.tokens) <= 1 else None,
            )
            seq.emitted = max(seq.emitted, len(visible))
            if generating:
                metrics.GENERATED_TOKENS.labels(request.metric_label).inc()
            if finish is None:
                keep.append(row)
            else:
                seq.finish_reason = finish
                self.slots.release(seq.slot)
            if request.cancelled:
                continue
            deltas.setdefault(id(request), (request, []))[1].append(delta)
        for request, request_deltas in deltas.values():
            request.sink(request_deltas)
            request.remaining -= sum(1 for d in request_deltas if d.finish_reason is not None)
            if request.remaining == 0:
                request.sink(None)
        if self._batch is not None:
            if not keep:
                self._batch = None
            elif len(keep) < len(self._batch):
                self._batch.keep(keep)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it, from the logits of the positions
    before it ((len(prompt) - 1, vocab)); the first token has none."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    if top:
        top_values, top_ids = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(ids, values, strict=True))
                        for ids, values in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
    else:
        alternatives = [()] * len(chosen)
    return [None, *(TokenLogprob(token, logprob, alts)
                    for token, logprob, alts in zip(prompt[1:], chosen, alternatives, strict=True))]


def scoring_groups(sequences: list[_Sequence], vocab: int) -> list[list[_Sequence]]:
    """`sequences` in prefill groups whose every-position logits stay within SCORING_LOGITS_BYTES."""
    groups: list[list[_Sequence]] = []
    group: list[_Sequence] = []
    longest = 0
    for seq in sequences:
        length = max(longest, len(seq.request.prompt_ids))
        if group and (len(group) + 1) * length * vocab * 4 > SCORING_LOGITS_BYTES:
            groups.append(group)
            group, length = [], len(seq.request.prompt_ids)
        group.append(seq)
        longest = length
    if group:
        groups.append(group)
    return groups
