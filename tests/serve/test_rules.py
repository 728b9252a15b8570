"""The pure rules of the server: adapter compatibility, allowed prefixes, stop strings, sampling."""

from __future__ import annotations

import pytest
from tessera.adapter_format import AdapterConfig, AdapterFormatError, check_allowed
from tessera.serve.runtime.adapters import AdapterError, ServedBase, compatibility_problems
from tessera.serve.runtime.engine import visible_text
from tessera.serve.runtime.registry import read_adapters_file

BASE = ServedBase(
    name="tessera/tiny-llama",
    architecture="LlamaForCausalLM",
    vocab_size=2272,
    linear_shapes={
        "model.layers.0.self_attn.q_proj": (128, 128),
        "model.layers.0.self_attn.v_proj": (128, 64),
        "lm_head": (128, 2272),
    },
    embedding_shapes={"model.embed_tokens": (2272, 128)},
)


def lora(module: str, rank: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": (rank, in_features), f"{prefix}.lora_B.weight": (out_features, rank)}


def codes(config: AdapterConfig, shapes: dict, card: dict | None = None, max_rank: int = 16) -> list[str]:
    return [code for code, _ in compatibility_problems(config, card or {}, shapes, BASE, max_rank)]


def test_a_matching_adapter_has_no_problems():
    shapes = {**lora("model.layers.0.self_attn.q_proj", 8, 128, 128), **lora("lm_head", 8, 128, 2272)}
    config = AdapterConfig(r=8, target_modules=["q_proj", "lm_head"], base_model_name_or_path="tessera/tiny-llama")
    assert compatibility_problems(config, {}, shapes, BASE, 16) == []


def test_other_base_model_is_refused_by_name_and_by_shape():
    config = AdapterConfig(base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    assert codes(config, lora("model.layers.0.self_attn.q_proj", 8, 128, 128)) == ["base_model_mismatch"]
    # A local training path says nothing about the model: the shapes decide.
    config = AdapterConfig(base_model_name_or_path="/tmp/job/base")
    assert codes(config, lora("model.layers.0.self_attn.q_proj", 8, 4096, 4096)) == ["base_model_mismatch"]
    assert codes(config, lora("model.layers.0.self_attn.q_proj", 8, 128, 128)) == []


def test_model_card_identity_wins_over_peft_config():
    config = AdapterConfig(base_model_name_or_path="/somewhere/local")
    card = {"baseModel": {"name": "acme/other"}, "architecture": "MistralForCausalLM", "vocabSize": 32000}
    assert sorted(set(codes(config, lora("model.layers.0.self_attn.q_proj", 8, 128, 128), card))) == [
        "base_model_mismatch", "vocab_mismatch"
    ]


def test_rank_above_maximum_missing_modules_and_unsupported_kinds():
    config = AdapterConfig(target_modules=["q_proj", "c_attn"])
    found = compatibility_problems(config, {}, lora("model.layers.0.self_attn.q_proj", 32, 128, 128), BASE, 16)
    assert [code for code, _ in found] == ["target_modules_missing", "rank_too_high"]
    assert "c_attn" in found[0][1] and "rank 32 exceeds the server's maximum 16" in found[1][1]
    many_layers = {**lora("model.layers.0.self_attn.q_proj", 8, 64, 64),
                   **lora("model.layers.0.self_attn.v_proj", 8, 64, 32)}
    (mismatch,) = compatibility_problems(AdapterConfig(), {}, many_layers, BASE, 16)
    assert mismatch == ("base_model_mismatch", "trained on another base model: model.layers.0.self_attn.q_proj maps "
                                               "64->64 but the base layer is 128->128 (and 1 more)")
    assert "adapter_unsupported" in codes(AdapterConfig(use_dora=True), lora("lm_head", 4, 128, 2272))
    full_embedding = {"base_model.model.model.embed_tokens.weight": (32000, 128)}
    assert codes(AdapterConfig(), full_embedding) == ["vocab_mismatch", "adapter_corrupt"]
    assert codes(AdapterConfig(), {}) == ["adapter_corrupt"]
    half = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (8, 128)}
    assert codes(AdapterConfig(), half) == ["adapter_corrupt"]


def embedding_lora(rank: int, vocab: int, hidden: int) -> dict[str, tuple[int, ...]]:
    prefix = "base_model.model.model.embed_tokens"
    return {f"{prefix}.lora_embedding_A": (rank, vocab), f"{prefix}.lora_embedding_B": (hidden, rank)}


def test_embedding_lora_fits_and_is_checked_like_a_layer():
    config = AdapterConfig(target_modules=["q_proj", "embed_tokens"])
    frozen_copy = {"base_model.model.model.embed_tokens.base_layer.weight": (2272, 128)}
    fitting = {**lora("model.layers.0.self_attn.q_proj", 8, 128, 128), **embedding_lora(8, 2272, 128), **frozen_copy}
    assert compatibility_problems(config, {}, fitting, BASE, 16) == []
    assert codes(config, embedding_lora(8, 32000, 128)) == ["base_model_mismatch"]
    assert codes(config, embedding_lora(8, 2272, 64)) == ["base_model_mismatch"]
    assert codes(config, embedding_lora(32, 2272, 128)) == ["rank_too_high"]
    # An embedding LoRA on a linear layer, or a base copy of another vocabulary, is not this base's.
    on_linear = {"base_model.model.lm_head.lora_embedding_A": (8, 128),
                 "base_model.model.lm_head.lora_embedding_B": (2272, 8)}
    assert codes(config, on_linear) == ["target_modules_missing"]
    other_copy = {**embedding_lora(8, 2272, 128), "base_model.model.model.embed_tokens.base_layer.weight": (32000, 128)}
    assert codes(config, other_copy) == ["vocab_mismatch"]


def test_what_stays_unsupported_is_refused_by_name():
    shapes = lora("model.layers.0.self_attn.q_proj", 8, 128, 128)
    for config, words in [
        (AdapterConfig(use_dora=True), "DoRA"),
        (AdapterConfig(modules_to_save=["lm_head"]), "modules_to_save"),
        (AdapterConfig(bias="lora_only"), "biases"),
        (AdapterConfig(lora_bias=True), "biases"),
    ]:
        ((code, message),) = compatibility_problems(config, {}, shapes, BASE, 16)
        assert code == "adapter_unsupported" and words in message
    trained_bias = {**shapes, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": (128,)}
    ((code, message),) = compatibility_problems(AdapterConfig(), {}, trained_bias, BASE, 16)
    assert code == "adapter_unsupported" and "lora_B.bias" in message


def test_allowed_prefixes(tmp_path):
    allowed = tmp_path / "adapters"
    (allowed / "a").mkdir(parents=True)
    (tmp_path / "adapters-evil").mkdir()
    check_allowed(str(allowed / "a"), [str(allowed)])
    check_allowed(f"file://{allowed / 'a'}", [str(allowed)])
    check_allowed("s3://tessera/adapters/ns/a/v1", ["s3://tessera/adapters"])
    check_allowed("/anything", [])
    refused = [
        str(tmp_path / "adapters-evil"),  # a sibling that merely shares the prefix string
        str(allowed / ".." / "adapters-evil"),
        "s3://tessera/adapters-evil/x",
        "s3://other/adapters/x",
    ]
    for path in refused:
        with pytest.raises(AdapterFormatError) as caught:
            check_allowed(path, [str(allowed), "s3://tessera/adapters"])
        assert caught.value.status == 403 and caught.value.code == "path_not_allowed", path
    with pytest.raises(AdapterFormatError) as caught:
        check_allowed("s3://tessera/adapters/../secrets", ["s3://tessera/adapters"])
    assert caught.value.code == "invalid_path"
    (tmp_path / "link").symlink_to(tmp_path / "adapters-evil")
    with pytest.raises(AdapterFormatError):
        check_allowed(str(allowed / ".." / "link"), [str(allowed)])


def test_allowed_prefix_holds_against_every_spelling_of_a_path(tmp_path):
    """The class of the `file:///allowed/%2e%2e/outside` bypass: whatever the spelling (percent-encoded
    dots or slashes, mixed case, `.`/`..` segments, links inside the prefix leading out), the location
    checked is the one returned to be read, and a path outside is refused whether it exists or not."""
    allowed = tmp_path / "allowed"
    (allowed / "adp").mkdir(parents=True)
    (tmp_path / "outside" / "adp").mkdir(parents=True)
    (allowed / "out-link").symlink_to(tmp_path / "outside")
    (allowed / "in-link").symlink_to(allowed / "adp")
    root = tmp_path.as_posix()
    escapes = [
        f"file://{root}/allowed/%2e%2e/outside/adp",
        f"file://{root}/allowed/%2E%2E/outside/adp",
        f"file://{root}/allowed/.%2e/outside/adp",
        f"file://{root}/allowed%2f..%2foutside/adp",
        f"file://{root}/allowed/adp/%2e%2e/%2e%2e/outside/adp",
        f"file://{root}/allowed/out-link/adp",
        f"{root}/allowed/./../outside/adp",
        f"{root}/allowed/out-link/adp",
    ]
    for spelling in escapes:
        for target in ("adp", "absent"):  # no existence oracle: the same answer either way
            path = spelling.replace("outside/adp", f"outside/{target}")
            with pytest.raises(AdapterFormatError) as caught:
                check_allowed(path, [f"file://{root}/allowed"])
            assert (caught.value.status, caught.value.code) == (403, "path_not_allowed"), path
    # Double encoding is decoded once: `%252e%252e` is a directory literally named `%2e%2e`, inside.
    inside = check_allowed(f"file://{root}/allowed/%252e%252e/adp", [str(allowed)])
    assert inside.path == allowed / "%2e%2e" / "adp"
    assert check_allowed(f"file://{root}/allowed/in-link", [str(allowed)]).path == allowed / "adp"
    assert check_allowed(f"file://{root}/allowed/adp/../adp", [str(allowed)]).path == allowed / "adp"
    for s3_escape in ("s3://tessera/adapters/../x", "s3://tessera/adapters/a/../../x"):
        with pytest.raises(AdapterFormatError):
            check_allowed(s3_escape, ["s3://tessera/adapters"])
    assert str(check_allowed("s3://tessera/adapters//a/./v1/", ["s3://tessera/adapters"])) == "s3://tessera/adapters/a/v1"


def test_visible_text_holds_back_possible_stop_strings():
    assert visible_text("The answer is positive.", ("\n",), final=False) == ("The answer is positive.", False)
    assert visible_text("positive\nmore", ("\n",), final=False) == ("positive", True)
    assert visible_text("positive END", ("END", "STOP"), final=False) == ("positive ", True)
    assert visible_text("positive EN", ("END",), final=False) == ("positive ", False)
    assert visible_text("positive EN", ("END",), final=True) == ("positive EN", False)
    assert visible_text("caf\ufffd", (), final=False) == ("caf", False)
    assert visible_text("a STOP b END", ("END", "STOP"), final=False) == ("a ", True)
    assert visible_text("xxabab", ("ababc",), final=False) == ("xx", False)  # the longest beginning is held
    assert visible_text("shown END", ("END",), final=False, shown=5) == ("shown ", True)


def test_the_stop_search_does_not_grow_with_the_text():
    """A step searches only what was not shown yet: a stop string inside text already shown (which
    the engine never lets happen) is not found again, which shows nothing before it was read."""
    text = "END" + "a" * 100_000
    assert visible_text(text, ("END",), final=False, shown=len(text)) == (text, False)


def test_top_p_keeps_the_nucleus_only():
    import torch
    from tessera.serve.runtime.sampling import SamplingParams, filter_top_p, next_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert filter_top_p(probs, 0.7).tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    assert filter_top_p(probs, 0.01).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    logits = torch.log(probs).repeat(2, 1)
    params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01)]
    tokens, reports = next_tokens(logits, params, [None, None])
    assert tokens == [0, 0]
    assert reports[0].token_id == 0 and reports[0].logprob == pytest.approx(-0.6931, abs=1e-3)
    assert [t for t, _ in reports[0].top] == [0, 1] and reports[1] is None


def test_adapters_file_is_refused_whole_naming_the_bad_entry(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('[{"name": "fpb", "path": "s3://tessera/adapters/default/fpb/v1"}]')
    assert [s.name for s in read_adapters_file(good)] == ["fpb"]
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text("adapters:\n  - name: fpb\n    path: /srv/fpb\n")
    assert read_adapters_file(wrapped)[0].path == "/srv/fpb"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: fpb\n  path: /srv/fpb\n- name: 'no spaces allowed'\n  path: /srv/x\n  sha: 12\n")
    with pytest.raises(AdapterError) as caught:
        read_adapters_file(bad)
    assert "[1.name]" in caught.value.message and "[1.sha]" in caught.value.message


def test_precision_follows_the_hardware():
    from tessera.serve.runtime.base_model import choose_precision, cpu_threads

    assert choose_precision(cuda=True, quantization="auto", dtype="auto", bf16_supported=True) == ("4bit", "bfloat16")
    assert choose_precision(cuda=True, quantization="8bit", dtype="auto", bf16_supported=False) == ("8bit", "float16")
    assert choose_precision(cuda=False, quantization="auto", dtype="auto", bf16_supported=False) == ("none", "float32")
    assert choose_precision(cuda=False, quantization="4bit", dtype="bfloat16", bf16_supported=False) == (
        "4bit", "bfloat16")
    assert cpu_threads(3) == 3 and cpu_threads(None) >= 1


def test_the_card_publish_writes_is_the_card_the_server_checks(tmp_path):
    """`tessera publish` takes the base's identity from its config.json; the server refuses an adapter
    whose card names another base, and accepts one whose card names its own."""
    import json

    from tessera.api.adapter_dir import MODEL_CARD_FILE, ModelCard
    from tessera.publish import base_model_identity

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "vocab_size": 32000}))
    architecture, vocab = base_model_identity(str(tmp_path))
    card = json.loads(json.dumps(ModelCard(architecture=architecture, vocab_size=vocab).to_json()))
    assert (card["architecture"], card["vocabSize"]) == ("MistralForCausalLM", 32000)
    shapes = lora("model.layers.0.self_attn.q_proj", 8, 128, 128)
    assert sorted(set(codes(AdapterConfig(), shapes, card))) == ["base_model_mismatch", "vocab_mismatch"]
    own = ModelCard(architecture=BASE.architecture, vocab_size=BASE.vocab_size).to_json()
    assert codes(AdapterConfig(), shapes, own) == []
    assert base_model_identity(str(tmp_path / "missing")) == (None, None)
    with pytest.raises(ValueError, match=f"{MODEL_CARD_FILE} is not a valid model card: vocabSize"):
        ModelCard.read({"vocabSize": "many"})
