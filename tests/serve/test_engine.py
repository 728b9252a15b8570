"""The engine in-process: batched mixed-adapter generation against peft and against one-at-a-time."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

PROMPTS = [
    "Nordea's net profit rose 12% in the third quarter.",
    "Gold prices fell",
    "What is the sentiment of this news?",
    "Analysts rate Tesla a buy",
    "x",
]


class Collector:
    """A request sink that records tokens per choice and signals when the request ended."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, str | None] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if event is None:
            self.done.set()
        elif isinstance(event, BaseException):
            self.error = event
            self.done.set()
        else:
            for delta in event:
                self.tokens.setdefault(delta.index, []).extend(delta.token_ids)
                if delta.finish_reason:
                    self.finish[delta.index] = delta.finish_reason


@dataclass
class Stack:
    engine: object
    tokenizer: object
    model: object
    spec: object
    prepared: dict


@pytest.fixture(scope="module")
def stack(tiny_base, adapters):
    """A started engine on the tiny model with adapters a0..a2 installed (capacity 3)."""
    import torch
    from tessera.serve.runtime.adapters import ServedBase, prepare_adapter
    from tessera.serve.runtime.engine import Engine
    from tessera.serve.runtime.lora import LoraSlots
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    spec = ServedBase.of(model, "tessera/tiny-llama")
    engine = Engine(model, tokenizer, LoraSlots(model, 4, torch.float32, torch.device("cpu")),
                    max_batch_size=16, max_wait=0.01, eos_token_ids={tokenizer.eos_token_id})
    engine.start()
    prepared = {}
    for name in ("a0", "a1", "a2"):
        prepared[name] = prepare_adapter(name, str(adapters[name]), Path(adapters[name]), spec, max_rank=64,
                                         expected_sha256=None)
        engine.install(name, prepared[name].weights).result(timeout=30)
    yield Stack(engine, tokenizer, model, spec, prepared)
    engine.stop()


def generate(engine, tokenizer, jobs, *, stagger: float = 0.0, **params):
    """Submit (prompt, adapter) jobs, optionally spaced out so later ones join a running batch."""
    from tessera.serve.runtime.engine import GenerationRequest
    from tessera.serve.runtime.sampling import SamplingParams

    sampling = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **params})
    collectors = []
    for prompt, adapter in jobs:
        collector = Collector()
        engine.submit(GenerationRequest(tokenizer(prompt).input_ids, adapter, sampling, collector))
        collectors.append(collector)
        if stagger:
            time.sleep(stagger)
    for collector in collectors:
        assert collector.done.wait(60), "request did not finish"
        assert collector.error is None, collector.error
    return [c.tokens[0] for c in collectors]


def test_mixed_adapter_batches_equal_one_request_at_a_time(stack, monkeypatch):
    from tessera.serve.runtime.engine import _Batch

    joined = []
    extend = _Batch.extend
    monkeypatch.setattr(_Batch, "extend", lambda batch, other: joined.append(len(other)) or extend(batch, other))
    engine, tokenizer = stack.engine, stack.tokenizer
    jobs = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, "a0", "a1", "a2")]
    alone = [generate(engine, tokenizer, [job])[0] for job in jobs]
    together = generate(engine, tokenizer, jobs)
    assert together == alone
    # Rows joining a batch that is already generating (continuous batching) get the same tokens too.
    joined.clear()
    staggered = generate(engine, tokenizer, jobs, stagger=0.004)
    assert staggered == alone
    assert joined, "no request joined a running batch"
    # The adapters really act: the same prompt gives different tokens on different adapters.
    by_prompt = [alone[i : i + 4] for i in range(0, len(alone), 4)]
    assert all(len({tuple(tokens) for tokens in group}) == 4 for group in by_prompt)


def test_stacked_lora_forward_matches_peft_adapter_names(stack, tiny_base, adapters):
    """The batched LoRA kernel computes what peft's own mixed-batch forward (`adapter_names`) computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, tokenizer, model = stack.engine, stack.tokenizer, stack.model
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["a0"],
                                          adapter_name="a0")
    reference.load_adapter(adapters["a1"], adapter_name="a1")
    reference.load_adapter(adapters["a2"], adapter_name="a2")
    reference.eval()
    batch = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    names = ["a1", "__base__", "a2", "a0"]
    slots = {name: slot for name, slot in engine.slots.resident.items()}
    with torch.no_grad():
        expected = reference(**batch, adapter_names=names).logits
        # The engine thread is idle between requests; set this forward's rows the way it does.
        engine.lora.batch.set([slots.get(name, 0) for name in names], torch.device("cpu"))
        actual = model(**batch).logits
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()


def test_seeded_sampling_is_the_same_alone_and_batched(stack):
    engine, tokenizer = stack.engine, stack.tokenizer
    job = (PROMPTS[0], "a1")
    alone = generate(engine, tokenizer, [job], temperature=1.0, seed=7)
    crowd = generate(engine, tokenizer, [(PROMPTS[1], "a0"), job, (PROMPTS[2], None)], temperature=1.0, seed=7)
    other_seed = generate(engine, tokenizer, [job], temperature=1.0, seed=8)
    assert crowd[1] == alone[0]
    assert other_seed[0] != alone[0]


def test_full_capacity_evicts_and_reloads_on_demand(stack, adapters):
    """Capacity 3 with a fourth adapter: the least recently used idle one is evicted, and a request
    for it triggers a reload (here the reloader reinstalls the prepared weights on a thread)."""
    engine, tokenizer, prepared = stack.engine, stack.tokenizer, stack.prepared
    before = {name: generate(engine, tokenizer, [(PROMPTS[0], name)])[0] for name in ("a0", "a1", "a2")}
    reloads: list[str] = []

    class Reloader:
        def request_reload(self, name: str) -> bool:
            if name not in prepared:
                return False
            reloads.append(name)
            threading.Thread(target=lambda: engine.install(name, prepared[name].weights).result()).start()
            return True

    from tessera.serve.runtime.adapters import prepare_adapter
    from tessera.serve.runtime.engine import GenerationRequest
    from tessera.serve.runtime.sampling import SamplingParams

    prepared["a3"] = prepare_adapter("a3", str(adapters["a3"]), Path(adapters["a3"]), stack.spec, max_rank=64,
                                     expected_sha256=None)
    engine.reloader = Reloader()
    try:
        engine.install("a3", prepared["a3"].weights).result(timeout=30)
        assert len(engine.resident()) == 3 and "a3" in engine.resident()
        evicted = ({"a0", "a1", "a2"} - set(engine.resident())).pop()
        again = generate(engine, tokenizer, [(PROMPTS[0], evicted)])[0]
        assert again == before[evicted]
        assert reloads == [evicted]
        missing = Collector()
        engine.submit(GenerationRequest([1, 2, 3], "never-loaded", SamplingParams(max_tokens=2), missing))
        assert missing.done.wait(30) and getattr(missing.error, "status", None) == 404
    finally:
        engine.reloader = None


def test_embedding_lora_matches_peft_alone_and_batched(tiny_base, adapters):
    """Adapters with LoRA on `embed_tokens` (peft's `lora_embedding_A`/`_B`), one on every layer and
    one on the embedding alone, give peft's own logits and greedy tokens: alone, and batched with
    an adapter whose embedding is untouched and with the base model."""
    import torch
    from peft import PeftModel
    from tessera.serve.runtime.adapters import ServedBase, prepare_adapter
    from tessera.serve.runtime.engine import Engine
    from tessera.serve.runtime.lora import BatchedLoraEmbedding, LoraSlots
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ("embed", "embed-only", "a1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    spec = ServedBase.of(model, "tessera/tiny-llama")
    engine = Engine(model, tokenizer, LoraSlots(model, len(names) + 1, torch.float32, torch.device("cpu")),
                    max_batch_size=16, max_wait=0.01, eos_token_ids={tokenizer.eos_token_id})
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["embed"],
                                          adapter_name="embed")
    for name in names[1:]:
        reference.load_adapter(adapters[name], adapter_name=name)
    reference.eval()

    def peft_greedy(prompt: str, adapter: str, steps: int = 10) -> list[int]:
        """peft's forward, one adapter, no cache and no padding: the plainest greedy decode."""
        ids = tokenizer(prompt).input_ids
        if adapter != "__base__":
            reference.set_adapter(adapter)
        with torch.no_grad(), reference.disable_adapter() if adapter == "__base__" else nullcontext():
            for _ in range(steps):
                ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-steps:]

    engine.start()
    try:
        for name in names:
            prepared = prepare_adapter(name, str(adapters[name]), Path(adapters[name]), spec, max_rank=64,
                                       expected_sha256=None)
            engine.install(name, prepared.weights).result(timeout=30)
        assert isinstance(model.model.embed_tokens, BatchedLoraEmbedding)

        batch = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
        rows = ["embed", "a1", "__base__", "embed-only"]
        slots = dict(engine.slots.resident)
        with torch.no_grad():
            expected = reference(**batch, adapter_names=rows).logits
            engine.lora.batch.set([slots.get(name, 0) for name in rows], torch.device("cpu"))
            actual = model(**batch).logits
        assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()

        prompts = PROMPTS[:3]
        expected_tokens = {(prompt, name): peft_greedy(prompt, name) for prompt in prompts
                           for name in (*names, "__base__")}
        jobs = [(prompt, name) for prompt in prompts for name in (*names, None)]
        alone = [generate(engine, tokenizer, [job], max_tokens=10, ignore_eos=True)[0] for job in jobs]
        together = generate(engine, tokenizer, jobs, max_tokens=10, ignore_eos=True)
        wanted = [expected_tokens[prompt, name or "__base__"] for prompt, name in jobs]
        assert alone == wanted
        assert together == wanted
        # The embedding LoRA alone changes what the model says.
        assert all(expected_tokens[prompt, "embed-only"] != expected_tokens[prompt, "__base__"] for prompt in prompts)
    finally:
        engine.stop()
