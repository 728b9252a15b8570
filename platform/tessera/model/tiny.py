"""The tiny base model: a LLaMA-architecture causal LM that Tessera builds locally, offline.

It is the embedded default base model and every test's model. It has the shape of a real one
(LlamaForCausalLM, grouped-query attention, a byte-level BPE tokenizer with Llama-3 special tokens
and chat template) at a size that trains and serves on two CPU cores. Every linear dimension is a
multiple of 32 because bitsandbytes' 4-bit kernels need it, so the QLoRA path runs on it too.
Weights are random (fixed seed): it answers nonsense until a LoRA adapter is trained on it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tessera/tiny-llama"
IDENTITY_FILE = "tessera.json"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

VOCAB_SIZE = 4096
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 384
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 2048
LM_HEAD_STD = 0.1

# Llama 3's template: a header per turn, each turn closed by <|eot_id|>, which is also what
# generation stops on (the tokenizer's eos), exactly as Llama-3.1-Instruct does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_COMPANIES = [
    "Nordea", "Nokia", "Apple", "Tesla", "Siemens", "HSBC", "Barclays", "Microsoft", "Amazon",
    "Stora Enso", "UPM-Kymmene", "Fortum", "Kone", "Wartsila", "JPMorgan", "Goldman Sachs",
    "Exxon", "Shell", "BP", "Nestle", "Roche", "Novartis", "Alphabet", "Meta", "Nvidia", "Intel",
]
_METRICS = [
    "net sales", "operating profit", "net profit", "revenue", "EBITDA", "earnings per share",
    "order intake", "gross margin", "free cash flow", "dividend", "market share", "guidance",
]
_MOVES = ["rose", "fell", "increased", "decreased", "grew", "dropped", "jumped", "slipped", "stayed flat"]
_PERIODS = ["in the first quarter", "in Q2", "in the third quarter", "in Q4", "in 2023", "in 2024",
            "year-on-year", "from a year earlier", "compared with the previous period"]
_CURRENCIES = ["EUR", "USD", "GBP", "SEK", "$", "euro", "dollars"]
_ASSETS = ["gold", "silver", "crude oil", "the S&P 500", "the Nasdaq", "treasury yields",
           "the dollar index", "bitcoin", "copper", "natural gas"]
_QUESTIONS = [
    "Does the news headline talk about price going up?",
    "Does the news headline talk about price going down?",
    "Does the news headline talk about price staying constant?",
    "Does the news headline talk about a general event?",
    "Does the news headline compare gold with any other asset?",
    "Does the news headline talk about past price information?",
    "Does the news headline talk about future price information?",
]
# Everyday and business English, so real news text tokenizes into words rather than bytes.
_WORDS = """
the of and to in a for is on that with by as at from its was be has are will this have it an or
which said company said year million billion euro percent quarter period compared same last first
second third fourth half annual results share shares stock market price prices sales profit loss
operating net total income revenue growth increase decrease decline rise fall rose fell increased
decreased expected expects according board group business operations customers products services
production plant mill unit units agreement contract deal order orders value worth signed acquire
acquisition merger sold sell buy bought holding capital investment investor investors bank banks
financial finance credit loan loans interest rate rates inflation economy economic government tax
cost costs savings jobs employees staff workers personnel negotiations cut cuts reduce reduction new
based also about after before during over under than more less up down well however while would
could should may might can not no yes but all other such into their they he she we our his her them
were been had one two three four five six seven eight nine ten hundred thousand including include
includes approximately around some most time times week weeks month months today yesterday tomorrow
early late end beginning start started continue continued expand expansion market markets global
international domestic country countries Finland Finnish Europe European America American China
Chinese Russia Russian Sweden Swedish Germany German Britain British corporation corp ltd plc oyj
inc chief executive officer chairman president director manager management dividend dividends
earnings forecast outlook guidance estimate estimates analysts analyst report reported announced
announcement statement press release exchange stock-exchange listed trading traded index equity debt
bond bonds yield yields commodity gold silver oil gas energy power electricity technology software
mobile phone phones network telecom steel paper pulp forest construction retail food services
shipping airline airlines car cars automotive machinery engineering solutions systems equipment
""".split()
_ENTITY_TYPES = ["person", "organization", "location"]
_XBRL_TAGS = ["Revenues", "NetIncomeLoss", "Assets", "Liabilities", "StockholdersEquity",
              "EarningsPerShareBasic", "OperatingIncomeLoss", "CashAndCashEquivalents"]


def finance_corpus(lines: int = 600, seed: int = 1234) -> list[str]:
    """A few hundred finance-flavoured lines covering every task's prompt and answer words."""
    rng = random.Random(seed)
    answers = ["negative", "neutral", "positive", "yes", "no", "buy", "sell", "hold", "up", "down",
               "bearish", "bullish", "moderately bullish", "strongly bearish"]
    out = [" ".join(answers), "0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 250 500 1000 2024 2025",
           "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
           "Answer: Sentiment: Label: Instruction: Input: Output: Question: Context:"]
    for i in range(lines):
        company = rng.choice(_COMPANIES)
        amount = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        kind = i % 7
        if kind == 0:
            out.append(f"{company}'s {rng.choice(_METRICS)} {rng.choice(_MOVES)} {rng.randint(1, 60)}% to "
                       f"{rng.choice(_CURRENCIES)} {amount} million {rng.choice(_PERIODS)}.")
        elif kind == 1:
            out.append(f"Instruction: What is the sentiment of this news? Input: {company} "
                       f"{rng.choice(_MOVES)} {rng.choice(_PERIODS)}. Answer: {rng.choice(answers[:3])}")
        elif kind == 2:
            out.append(f"{rng.choice(_ASSETS).capitalize()} prices {rng.choice(_MOVES)} to {amount} "
                       f"{rng.choice(_PERIODS)}. {rng.choice(_QUESTIONS)} {rng.choice(['Yes', 'No'])}")
        elif kind == 3:
            out.append(f"Analysts rate {company} a {rng.choice(['buy', 'sell', 'hold'])} with a price target "
                       f"of {amount}; the stock may go {rng.choice(['up', 'down'])} next week.")
        elif kind == 4:
            out.append(f"{company} is an {rng.choice(_ENTITY_TYPES)}; its chief executive spoke in "
                       f"{rng.choice(['Helsinki', 'London', 'New York', 'Frankfurt', 'Stockholm'])}.")
        elif kind == 5:
            out.append(f"XBRL tag {rng.choice(_XBRL_TAGS)} value {amount} for fiscal year "
                       f"{rng.randint(2015, 2025)}.")
        else:
            out.append(f"$${company.split()[0].upper()[:4]} {rng.choice(answers[10:])}: "
                       f"{rng.choice(_MOVES)} {rng.randint(1, 20)}% after earnings #stocks")
        words = rng.sample(_WORDS, 12)
        out.append(" ".join([words[0].capitalize(), *words[1:]]) + rng.choice([".", ",", ";", "?"]))
    return out


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(finance_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _is_complete(path: Path, seed: int) -> bool:
    identity = path / IDENTITY_FILE
    if not identity.is_file():
        return False
    try:
        return json.loads(identity.read_text()).get("seed") == seed
    except (OSError, ValueError):
        return False


def _build(path: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = _train_tokenizer(VOCAB_SIZE)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOT, pad_token=PAD, model_max_length=MAX_POSITIONS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    # A vocabulary a multiple of 32 keeps the embedding and lm_head 4-bit-quantizable.
    vocab = -(-len(tokenizer) // 32) * 32
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # With the default 0.02 init, logits are nearly flat and, as LoRA does not train lm_head, a
    # fine-tune can pick the right answer but never become confident (loss stalls near ln(vocab)).
    # A wider lm_head lets a LoRA adapter reach a low loss in a few steps, as on a real model.
    with torch.no_grad():
        model.lm_head.weight.normal_(mean=0.0, std=LM_HEAD_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    # Written last: its presence marks the directory complete.
    identity = {"name": TINY_MODEL_NAME, "seed": seed, "architecture": "LlamaForCausalLM", "vocabSize": vocab}
    (path / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def init_tiny(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the tiny model to `path` (created if needed) and return it; a complete one is kept.

    The model is built in a sibling temporary directory and moved in, so a crash or a concurrent
    builder never leaves a half-written model that a later call would take as complete.
    """
    path = Path(path)
    if _is_complete(path, seed):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _build(staging, seed)
        if path.exists() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():
            for item in staging.iterdir():
                if item.name != IDENTITY_FILE:
                    os.replace(item, path / item.name)
            os.replace(staging / IDENTITY_FILE, path / IDENTITY_FILE)
        else:
            try:
                os.replace(staging, path)
            except OSError:
                # Another builder won the race; its model is identical (same seed).
                if not _is_complete(path, seed):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
