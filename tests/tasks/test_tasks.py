"""The financial tasks: prompts, gold-label normalisation, answer parsing, and each task's metrics."""

from __future__ import annotations

import json

import pytest
from tessera.errors import InvalidSpecError
from tessera.tasks import TASKS, Example, RowError, get_task

EXPECTED_TASKS = {"sentiment", "headline", "ner", "xbrl-tags", "xbrl-values", "recommendation", "forecast",
                  "text", "chat"}


def test_registry_holds_every_task_of_the_api_and_names_unknown_ones():
    from tessera.api.finetunejob import TaskName

    assert set(TASKS) == EXPECTED_TASKS == set(TaskName.__args__)
    with pytest.raises(InvalidSpecError, match="spec.dataset.task: unknown task 'sentimnet'"):
        get_task("sentimnet")


def test_sentiment_prompt_is_fingpt_style_and_completion_is_the_label():
    example = get_task("sentiment").to_example({"text": "  Profit rose 20%.  ", "label": "Positive"})
    assert example.prompt == (
        "Instruction: What is the sentiment of this news? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: Profit rose 20%.\nAnswer: "
    )
    assert (example.completion, example.label) == ("positive", "positive")


@pytest.mark.parametrize(
    ("generated", "label"),
    [
        ("Positive.", "positive"),
        ("positive", "positive"),
        ("the sentiment is negative", "negative"),
        ("NEUTRAL", "neutral"),
        ("Answer: neutral\n\nThe news is mixed", "neutral"),
        ('{"answer": "negative"} because sales fell', "negative"),
        ('Sure! {"sentiment": "Positive", "reason": "profit up"}', "positive"),
        ("moderately bullish", "positive"),
        ("Strongly bearish on the stock", "negative"),
        ("negative, then positive later", "negative"),
        # A chatty base echoes the choices first: the echo is not its answer.
        ("Choosing from {negative/neutral/positive}, the sentiment of this news is positive.", "positive"),
        ("Negative, neutral or positive? It is neutral.", "neutral"),
        ("The sentiment of this financial news is Neutral", "neutral"),
        ("Bullish.", "positive"),
        ("", None),
        ("I cannot tell", None),
        ("positively", None),
        ('{"answer": 3}', None),
    ],
)
def test_sentiment_parses_many_phrasings(generated, label):
    assert get_task("sentiment").parse(generated) == label


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("negative", "negative"),
        ("Neutral", "neutral"),
        ("strong negative", "negative"),  # NWGI's seven grades fold to three
        ("moderately positive", "positive"),
        ("mildly negative", "negative"),
        ("-0.37", "negative"),  # FiQA-SA scores
        ("0.05", "neutral"),
        ("0.612", "positive"),
    ],
)
def test_sentiment_normalises_fpb_nwgi_and_fiqa_labels(raw, label):
    assert get_task("sentiment").to_example({"text": "x", "label": raw}).label == label


def test_sentiment_integer_classes_need_the_label_map_and_say_so():
    with pytest.raises(RowError, match=r"unknown label '2'.*labelMap") as error:
        get_task("sentiment").to_example({"text": "x", "label": 2})
    assert error.value.field == "label"


def test_sentiment_refuses_missing_and_empty_text():
    task = get_task("sentiment")
    with pytest.raises(RowError, match="missing field 'text'"):
        task.to_example({"label": "positive"})
    with pytest.raises(RowError, match="empty text"):
        task.to_example({"text": "   ", "label": "positive"})
    with pytest.raises(RowError, match="missing field 'label'"):
        task.to_example({"text": "x", "label": float("nan")})


def test_headline_wide_row_becomes_one_yes_no_example_per_question():
    task = get_task("headline")
    row = {"text": "gold suffers third straight daily decline", "Price Direction Up": "0",
           "Price Direction Constant": "0", "Price Direction Down": "1", "Asset Comparision": "0",
           "Past Information": "1", "Future Information": "0", "Price Sentiment": "negative", "Dates": "x"}
    examples = task.to_examples(row)
    assert len(examples) == 6
    assert [e.label for e in examples] == ["no", "no", "yes", "yes", "no", "no"]
    down = examples[2]
    assert down.prompt == (
        "Instruction: Does the news headline talk about price going down? Please choose an answer from "
        "{Yes/No}.\nInput: gold suffers third straight daily decline\nAnswer: "
    )
    assert down.completion == "Yes"


def test_headline_long_rows_and_missing_questions():
    task = get_task("headline")
    [example] = task.to_examples({"text": "Gold rises", "question": "Is it about gold?", "label": "true"})
    assert example.label == "yes"
    with pytest.raises(RowError, match="missing field"):
        task.to_examples({"text": "Gold rises"})


@pytest.mark.parametrize(
    ("generated", "label"),
    [("Yes", "yes"), ("no,", "no"), ("YES.", "yes"), ("The answer is no.", "no"),
     ('{"answer": "Yes"}', "yes"), ("None of them", None), ("not sure", None), ("True", "yes"),
     ("Yes/No: No, it talks about the past.", "no")],
)
def test_headline_parses_yes_no(generated, label):
    assert get_task("headline").parse(generated) == label


def test_ner_prompt_labels_and_parsing():
    task = get_task("ner")
    example = task.to_example({"text": "Kone opened an office in Helsinki .", "entity": "Helsinki", "label": "LOC"})
    assert example.label == "location"
    assert "'Helsinki'" in example.prompt and "{person/organization/location}" in example.prompt
    assert task.parse("It is an organisation.") == "organization"
    assert task.parse('{"type": "person"}') == "person"
    assert task.parse("city") == "location"
    with pytest.raises(RowError, match="does not occur"):
        task.to_example({"text": "Kone opened an office.", "entity": "Helsinki", "label": "location"})


def test_xbrl_tags_open_label_set_and_parsing():
    task = get_task("xbrl-tags")
    example = task.to_example({"text": "Revenues were $5,000.", "value": "5,000", "label": "us-gaap:Revenues"})
    assert (example.completion, example.label) == ("Revenues", "Revenues")
    assert task.parse("The tag is us-gaap:NetIncomeLoss.") == "NetIncomeLoss"
    assert task.parse("The correct tag is StockholdersEquity") == "StockholdersEquity"
    assert task.parse('{"tag": "us-gaap:Assets"}') == "Assets"
    assert task.parse("assets, probably") is None
    with pytest.raises(RowError, match="unknown label"):
        task.to_example({"text": "x", "value": "1", "label": "net income"})


@pytest.mark.parametrize(
    ("generated", "value"),
    [("1250000", "1250000"), ("$1,250,000", "1250000"), ("$1.25 million", "1250000"), ("(350)", "-350"),
     ("The value is 3.84.", "3.84"), ('{"value": "2,000"}', "2000"), ("unknown", None)],
)
def test_xbrl_values_reads_numbers_in_any_spelling(generated, value):
    assert get_task("xbrl-values").parse(generated) == value


def test_xbrl_values_gold_label_must_be_a_number():
    task = get_task("xbrl-values")
    assert task.to_example({"text": "x", "tag": "us-gaap:Revenues", "label": "1,200.50"}).label == "1200.5"
    with pytest.raises(RowError, match="not a number"):
        task.to_example({"text": "x", "tag": "Revenues", "label": "n/a"})


def test_recommendation_answers_in_json_and_scores_conviction():
    task = get_task("recommendation")
    example = task.to_example({"ticker": "ACME", "table": '{"pe_ratio": 12.5, "revenue_growth_pct": 8}',
                               "label": "Buy", "conviction": "0.8"})
    assert json.loads(example.completion) == {"action": "buy", "conviction": 0.8}
    assert "| pe_ratio | 12.5 |" in example.prompt and "ACME" in example.prompt
    assert task.parse('Here you go: {"action": "SELL", "conviction": 0.3} hope it helps') == "sell"
    assert task.parse("I would hold this stock") == "hold"
    assert task.parse("Strong buy!") == "buy"
    scores = task.score([example, example], ['{"action": "buy", "conviction": 0.6}', "hold, conviction: 0.9"])
    assert scores["accuracy"] == 0.5
    assert scores["conviction_mse"] == pytest.approx(((0.6 - 0.8) ** 2 + (0.9 - 0.8) ** 2) / 2)


def test_recommendation_flat_columns_are_the_table_and_conviction_is_checked():
    task = get_task("recommendation")
    example = task.to_example({"pe": "14", "growth": "5%", "label": "hold", "conviction": 0.5, "_row": 3})
    assert "| pe | 14 |" in example.prompt and "_row" not in example.prompt
    with pytest.raises(RowError, match=r"outside \[0, 1\]"):
        task.to_example({"table": {"pe": 1}, "label": "buy", "conviction": 1.5})
    with pytest.raises(RowError, match="not valid JSON"):
        task.to_example({"table": "{pe: 1", "label": "buy", "conviction": 0.5})


@pytest.mark.parametrize(
    ("raw", "label"),
    [(2.4, "up 2-3%"), ("-1.3%", "down 1-2%"), ("U3", "up 2-3%"), ("D5+", "down 5+%"), ("Up by 0-1%", "up 0-1%"),
     ("down more than 5%", "down 5+%"), (7.9, "up 5+%"), ("0", "up 0-1%")],
)
def test_forecast_normalises_returns_and_bins(raw, label):
    assert get_task("forecast").to_example({"history": [1.0, -2.0], "label": raw}).label == label


def test_forecast_prompt_parsing_and_metrics():
    task = get_task("forecast")
    example = task.to_example({"ticker": "ACME", "history": "[1.25, -0.5]", "news": ["ACME wins a contract"],
                               "label": "U3"})
    assert example.completion == "Up by 2-3%"
    assert "Recent returns (oldest first): +1.2%, -0.5%" in example.prompt  # 1.25 rounds half-even
    assert "News: ACME wins a contract" in example.prompt
    assert task.parse("Prediction: Down by more than 5%") == "down 5+%"
    assert task.parse("I expect a 1.4% fall") == "down 1-2%"
    assert task.parse("It will go up") is None
    golds = ["up 2-3%", "down 0-1%", "up 5+%"]
    scores = task.metrics(["up 1-2%", "down 0-1%", None], golds)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["binary_accuracy"] == pytest.approx(2 / 3)
    assert scores["mse"] == pytest.approx(((1.5 - 2.5) ** 2 + 0) / 2)  # unparsed answers leave the MSE
    with pytest.raises(RowError, match="needs 'history', 'news' or 'text'"):
        task.to_example({"label": "U1"})


def test_chat_keeps_messages_and_learns_the_last_answer():
    task = get_task("chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is EBITDA?"},
                {"role": "assistant", "content": "Earnings before interest, taxes, D and A."}]
    example = task.to_example({"messages": json.dumps(messages)})
    assert example.messages == messages
    assert example.completion == messages[-1]["content"]
    assert example.prompt == "System: Be brief.\nUser: What is EBITDA?\nAssistant: "
    for bad, reason in [([], "non-empty list"), (messages[:2], "last message must be the assistant"),
                        ([{"role": "bot", "content": "x"}], "role 'bot'"),
                        ([{"role": "user", "content": " "}, messages[2]], "content is empty")]:
        with pytest.raises(RowError, match=reason):
            task.to_example({"messages": bad})
    scores = task.score([example], ["Earnings before interest, taxes, D and A."])
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_text_examples_are_whole_documents_without_labels():
    task = get_task("text")
    example = task.to_example({"text": "Nordea's net sales rose."})
    assert example == Example(prompt="", completion="Nordea's net sales rose.")
    assert task.chunked and task.default_metric == "eval_loss"


def test_classification_scores_count_unparsed_answers_as_wrong():
    task = get_task("sentiment")
    examples = [task.to_example({"text": "x", "label": label}) for label in ["positive", "negative", "neutral"]]
    scores = task.score(examples, ["Positive!", "no idea", "neutral"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["unparsed_rate"] == pytest.approx(1 / 3)
    assert scores["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["f1_weighted"] == pytest.approx(2 / 3)


def test_example_round_trips_through_a_prepared_row():
    example = Example(prompt="p", completion="c", label="l")
    assert Example.from_dict({**example.to_dict(), "row": 3, "line": 4}) == example


def test_stratify_key_reads_labels_through_the_label_map():
    task = get_task("sentiment")
    assert task.stratify_key({"text": "x", "label": "2"}, {"2": "neutral"}) == "neutral"
    assert task.stratify_key({"text": "x", "label": "2"}) is None  # unreadable without the map
    assert get_task("headline").stratify_key({"text": "x", "Price Direction Up": 1, "Past Information": 0}) is None
    assert get_task("chat").stratify_key({"messages": []}) is None
