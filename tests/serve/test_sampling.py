"""Sampling cannot produce non-finite values for any accepted parameter, rows are isolated (one row that
cannot be sampled fails its request alone), and adapters are checked after scaling and quoted never."""

from __future__ import annotations

import threading

import pytest
import torch
from tessera.serve.runtime.sampling import SamplingParams, next_tokens

TEMPERATURES = [5e-324, 1e-300, 1e-40, 1e-12, 1e-6, 0.01, 0.7, 1.0, 2.0]
TOP_PS = [1e-300, 1e-9, 0.1, 0.9, 1.0]


def _hostile_logits(rows: int, vocab: int = 64) -> torch.Tensor:
    """Logits a real model can emit: huge spreads, ties, float16's extremes, all one value."""
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 30
    logits[0::4] *= 1e4
    logits[1::4, :8] = torch.finfo(torch.float16).max
    logits[2::4] = -1e30
    logits[3::4, 5] = 1e38
    return logits


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_every_accepted_temperature_and_top_p_samples_a_valid_token(temperature):
    params = [SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, logprobs=3)
              for top_p in TOP_PS for _ in range(2)]
    logits = _hostile_logits(len(params))
    tokens, reports = next_tokens(logits, params, [None] * len(params))
    assert all(isinstance(t, int) and 0 <= t < logits.shape[1] for t in tokens), tokens
    for report in reports:
        assert report is not None and report.logprob <= 0 and all(v == v for _, v in report.top)


def test_a_tiny_temperature_is_greedy_in_the_limit():
    logits = torch.randn(3, 50)
    params = [SamplingParams(max_tokens=1, temperature=1e-40)] * 3
    tokens, _ = next_tokens(logits, params, [None] * 3)
    assert tokens == logits.argmax(-1).tolist()


def test_a_non_finite_row_fails_alone():
    logits = torch.randn(4, 32)
    logits[1, 3] = float("nan")
    logits[2] = float("inf")
    params = [SamplingParams(max_tokens=1, temperature=t, logprobs=2) for t in (0.0, 0.7, 0.0, 1e-40)]
    tokens, reports = next_tokens(logits, params, [None] * 4)
    assert tokens[1] is None and tokens[2] is None and reports[1] is None and reports[2] is None
    assert tokens[0] == int(logits[0].argmax()) and isinstance(tokens[3], int) and reports[3] is not None


def test_an_overflowing_adapter_fails_its_requests_not_the_batch(tiny_base):
    """A real engine on the tiny model: requests to the base model (one with temperature 1e-40) share
    the batch with requests to an adapter whose scaled weights overflow the activations to inf/NaN;
    the base requests finish with tokens, the adapter's get a `generation_failed` error."""
    from tessera.serve.errors import ServeError
    from tessera.serve.runtime.engine import Engine, GenerationRequest
    from tessera.serve.runtime.lora import AdapterWeights, LoraSlots
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    engine = Engine(model, tokenizer, LoraSlots(model, 2, torch.float32, torch.device("cpu")),
                    max_batch_size=16, max_wait=0.2, eos_token_ids=set())
    layer = model.model.layers[0].mlp.down_proj
    rank = 4
    hot = AdapterWeights(modules={"model.layers.0.mlp.down_proj": (
        torch.full((rank, layer.in_features), 1e10), torch.full((layer.out_features, rank), 1e30))}, rank=rank)
    engine.start()
    try:
        engine.install("hot", hot).result(timeout=30)
        results: list[tuple[str | None, threading.Event, list]] = []
        ids = tokenizer("Gold prices fell").input_ids
        for adapter, temperature in [(None, 0.0), ("hot", 0.7), (None, 1e-40), ("hot", 0.0), (None, 1.0)]:
            done, events = threading.Event(), []

            def sink(event, done=done, events=events):
                events.append(event)
                if event is None or isinstance(event, BaseException):
                    done.set()

            params = SamplingParams(max_tokens=6, temperature=temperature, seed=1)
            engine.submit(GenerationRequest(ids, adapter, params, sink, n=2))
            results.append((adapter, done, events))
        for adapter, done, events in results:
            assert done.wait(60)
            if adapter == "hot":
                assert isinstance(events[-1], ServeError) and events[-1].code == "generation_failed"
                assert sum(isinstance(e, BaseException) for e in events) == 1
            else:
                assert events[-1] is None
                tokens = [t for batch in events[:-1] for delta in batch for t in delta.token_ids]
                assert len(tokens) == 12  # n=2 × max_tokens=6, every one sampled
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def small_adapter(tiny_base, tmp_path_factory):
    from tests.serve.helpers import make_adapter

    return make_adapter(tiny_base, tmp_path_factory.mktemp("scaled") / "adp", seed=3, rank=4)


def _with_config(source, tmp_path, **changes):
    import json
    import shutil

    copy = tmp_path / f"adp-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(source, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_adapter_scales_are_checked_after_scaling(tiny_base, small_adapter, tmp_path):
    """lora_alpha/r and alpha_pattern values are finite numbers, yet the product with B overflows:
    every spelling is refused at load with a 4xx reason, never served."""
    from tessera.serve.runtime.adapters import AdapterError, ServedBase, prepare_adapter
    from transformers import AutoModelForCausalLM

    spec = ServedBase.of(AutoModelForCausalLM.from_pretrained(tiny_base), None)
    assert prepare_adapter("ok", "x", small_adapter, spec, max_rank=16, expected_sha256=None).rank == 4
    for changes in ({"lora_alpha": 1e308}, {"lora_alpha": 1e42}, {"lora_alpha": float("inf")},
                    {"lora_alpha": 1e300, "use_rslora": True}, {"alpha_pattern": {"q_proj": 1e300}},
                    {"alpha_pattern": {"self_attn.v_proj": float("nan")}}):
        with pytest.raises(AdapterError) as caught:
            prepare_adapter("bad", "x", _with_config(small_adapter, tmp_path, **changes), spec, max_rank=16,
                            expected_sha256=None)
        assert caught.value.status == 400 and caught.value.code == "adapter_corrupt", changes
        assert "lora_alpha/r" in caught.value.message
    with pytest.raises(AdapterError) as caught:
        prepare_adapter("bad", "x", _with_config(small_adapter, tmp_path, alpha_pattern={"(": 1}), spec,
                        max_rank=16, expected_sha256=None)
    assert caught.value.status == 400 and "is not a module name" in caught.value.message
    half = ServedBase(**{**spec.__dict__, "dtype": torch.float16})  # finite in float32, not in float16
    with pytest.raises(AdapterError, match="overflow float16"):
        prepare_adapter("bad", "x", _with_config(small_adapter, tmp_path, lora_alpha=4e6), half, max_rank=16,
                        expected_sha256=None)


def test_adapter_files_never_echo_what_they_link_to(tiny_base, small_adapter, tmp_path):
    """An adapter_config.json (or model card) that is a link to a credentials file, or a config whose
    fields hold text, is refused naming the file and field, never quoting the content."""
    import shutil

    from tessera.serve.runtime.adapters import AdapterError, ServedBase, prepare_adapter
    from transformers import AutoModelForCausalLM

    spec = ServedBase.of(AutoModelForCausalLM.from_pretrained(tiny_base), None)
    canary = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    credentials = tmp_path / "credentials"
    for content in (f"[default]\naws_secret_access_key = {canary}\n", f'"{canary}"', f'{{"r": "{canary}"}}',
                    f'{{"lora_alpha": "{canary}"}}'):
        credentials.write_text(content)
        for name in ("adapter_config.json", "model-card.json"):
            copy = tmp_path / f"linked-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(small_adapter, copy)
            (copy / name).unlink(missing_ok=True)
            (copy / name).symlink_to(credentials)
            with pytest.raises(AdapterError) as caught:
                prepare_adapter("x", str(copy), copy, spec, max_rank=16, expected_sha256=None)
            assert canary not in caught.value.message and canary not in str(caught.value)
            assert name in caught.value.message
        inline = _with_config(small_adapter, tmp_path)
        (inline / "adapter_config.json").write_text(content)
        with pytest.raises(AdapterError) as caught:
            prepare_adapter("x", str(inline), inline, spec, max_rank=16, expected_sha256=None)
        assert canary not in caught.value.message, content
