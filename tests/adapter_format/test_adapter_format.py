"""The adapter format layer below both runtimes: one rule, one code and one status for each failure,
whichever runtime (Tessera's server or the vLLM agent) reads the adapter. Torch-free: adapters are
written byte by byte as PEFT writes them (a JSON config and a safetensors file)."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import pytest
from tessera.adapter_format import (
    AdapterConfig,
    AdapterFormatError,
    pattern_value,
    read_adapter,
    read_checked_adapter,
    shared_problems,
    store_refusals,
)
from tessera.adapter_format.runtime import RuntimeProfile
from tessera.agent.rules import AgentError, servability_problems
from tessera.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from tessera.serve.runtime.adapters import AdapterError, ServedBase, adapter_refusals, compatibility_problems

MODULE = "model.layers.0.self_attn.q_proj"
SERVED = ServedBase(name="acme/served", architecture="LlamaForCausalLM", vocab_size=100,
                    linear_shapes={MODULE: (16, 16)})
VLLM = RuntimeProfile("vllm", max_lora_rank=16, base_model="acme/served", target_modules=frozenset({"q_proj"}))
# Catastrophic backtracking: a nested quantifier, overlapping alternatives repeated, a bounded repeat
# of `.*`. Each ran for longer than 8 s (then killed) as the server matched keys before this layer,
# `re.match(rf"(.*\.)?(?:{key})$", "model.layers.0.self_attn.q_proj")`.
HOSTILE_KEYS = (r"([\w.]+)+x", r"(.|\w)*x", r"(.*){1,32}x")


def write_adapter(directory: Path, **config: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, **config}))
    tensors = {f"base_model.model.{MODULE}.lora_A.weight": [4, 16], f"base_model.model.{MODULE}.lora_B.weight": [16, 4]}
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    (directory / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset)
    return directory


def both_runtimes(directory: Path) -> dict[str, tuple[str, int]]:
    """(code, status) each runtime's read → check path ends with, by runtime; ("ok", 200) when accepted."""
    outcomes = {}
    checks = {"tessera": lambda f: compatibility_problems(f.config, f.card, f.shapes, SERVED, 16),
              "vllm": lambda f: servability_problems(f.config, f.card, f.shapes, VLLM)}
    for runtime, problems in checks.items():
        try:
            read_checked_adapter(directory, problems)
        except AdapterFormatError as error:
            outcomes[runtime] = (error.code, error.status)
        else:
            outcomes[runtime] = ("ok", 200)
    return outcomes


def test_pattern_keys_that_are_regexes_are_refused_by_both_runtimes_without_running_them(tmp_path):
    """Issue 23, defect 4: an alpha_pattern or rank_pattern key ran as a regular expression against every
    module path; these keys would hold a loader worker for good. Refused, naming the key, without being
    run. The thread's join timeout is only a safety net so a regression fails instead of hanging CI."""
    results: dict[str, object] = {}

    def load_all() -> None:
        for i, key in enumerate(HOSTILE_KEYS):
            for field in ("alpha_pattern", "rank_pattern"):
                directory = write_adapter(tmp_path / f"{field}-{i}", **{field: {key: 4}})
                results[f"{field}-{i}"] = both_runtimes(directory)
                with pytest.raises(AdapterFormatError) as caught:
                    read_checked_adapter(directory, lambda f: compatibility_problems(f.config, f.card, f.shapes,
                                                                                     SERVED, 16))
                results[f"{field}-{i}-message"] = caught.value.message

    worker = threading.Thread(target=load_all, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "checking a pattern key did not finish"
    assert len(results) == 4 * len(HOSTILE_KEYS)
    for name, outcome in results.items():
        if name.endswith("-message"):
            field = name.split("-")[0]
            assert f"{field} key" in outcome and "is not a module name" in outcome, outcome
        else:
            assert outcome == {"tessera": ("adapter_unsupported", 400), "vllm": ("adapter_unsupported", 400)}, name


def test_pattern_keys_match_module_names_as_peft_does():
    """PEFT's `get_pattern_key` (`(.*\\.)?(key)$`, first key wins) for keys that are module names."""
    patterns = {"^model.layers.1.self_attn.q_proj": 1.0, "self_attn.q_proj": 2.0, "q_proj": 3.0, "proj": 4.0}
    assert pattern_value(patterns, MODULE) == 2.0
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj") == 1.0
    assert pattern_value(patterns, "model.layers.0.cross_attn.q_proj") == 3.0
    assert pattern_value(patterns, "model.layers.0.mlp.up_proj") is None  # `proj` is not a dotted suffix
    assert pattern_value({"layers.0.self_attn.q_proj": 5.0}, "model.layers.10.self_attn.q_proj") is None
    plain = AdapterConfig(alpha_pattern={"q_proj": 16, "^model.layers.0.mlp.down_proj": 2, "layers.0.mlp": 1},
                          rank_pattern={"self_attn.v_proj": 8})
    assert shared_problems(plain, {}, where="here", served_base=None) == []
    too_long = AdapterConfig(alpha_pattern={"a" * 257: 1})
    assert [c for c, _ in shared_problems(too_long, {}, where="here", served_base=None)] == ["adapter_unsupported"]


def test_a_declared_base_name_is_judged_by_its_spelling_on_both_runtimes(tmp_path, monkeypatch):
    """Drift kept out: Tessera's runtime took a declared base name for a path when a file of that name
    existed in its working directory (and skipped the comparison), the agent did not. Now both compare
    `acme/other` with the served base, whatever lies on disk; a path-like name is skipped by both."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "other").mkdir(parents=True)
    named = write_adapter(tmp_path / "named", base_model_name_or_path="acme/other")
    assert both_runtimes(named) == {"tessera": ("base_model_mismatch", 400), "vllm": ("base_model_mismatch", 400)}
    local = write_adapter(tmp_path / "local", base_model_name_or_path="./acme/other")
    assert both_runtimes(local) == {"tessera": ("ok", 200), "vllm": ("ok", 200)}


def test_one_code_and_one_status_for_the_same_failure_everywhere(tmp_path):
    """Drift kept out: a checksum mismatch was `sha256_mismatch` on the server and `digest_mismatch` in the
    agent; a store that answered with an error was a 400 on the server and a 502 in the agent."""
    directory = write_adapter(tmp_path / "a")
    with pytest.raises(AdapterFormatError) as caught:
        read_adapter(directory, expected_sha256="0" * 64)
    mismatch = caught.value
    failures = [mismatch]
    for error, expected in ((ObjectNotFoundError("gone"), ("adapter_not_found", 404)),
                            (StoreUnavailableError("down"), ("store_unavailable", 503)),
                            (StoreError("refused"), ("store_error", 502))):
        with pytest.raises(AdapterFormatError) as caught, store_refusals("s3://b/adapters/x"):
            raise error
        assert (caught.value.code, caught.value.status) == expected
        failures.append(caught.value)
    assert (mismatch.code, mismatch.status) == ("sha256_mismatch", 400)
    for failure in failures:
        with pytest.raises(AdapterError) as on_server, adapter_refusals():
            raise failure
        in_agent = AgentError.of(failure)
        assert (on_server.value.code, on_server.value.status) == (in_agent.code, in_agent.status) == (
            failure.code, failure.status)


def test_every_coded_error_is_redacted_where_it_is_made(monkeypatch):
    """Drift kept out: only the server's errors were redacted, the agent's were not."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    text = "cannot read s3://minio:hunter2@store/adapters/x with key wJalrXUtnFEMI-K7MDENG"
    for error in (AgentError(text, code="store_error"), AdapterError(text, code="store_error"),
                  AdapterFormatError(text, code="store_error")):
        assert "hunter2" not in error.message and "wJalrXUtnFEMI" not in error.message and "***" in error.message
        assert str(error) == error.message and error.status == 502
