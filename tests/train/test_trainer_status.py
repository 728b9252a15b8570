"""The trainer's KEP-2779 progress reports to Kubeflow Trainer v2, over real HTTPS on 127.0.0.1.

Stands in for the Trainer controller's status server: tests/operator/trainer_status_server.py
(same route, TLS from its own CA, bearer-token check per TrainJob, body checked against the
TrainJob CRD's `status.trainerStatus` schema of Trainer v2.3.0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tessera.train.trainer_status import (
    CA_ENV,
    MIN_INTERVAL_SECONDS,
    TOKEN_ENV,
    URL_ENV,
    TrainerStatusReporter,
    trainer_status,
)

from tests.operator.trainer_status_server import TrainerStatusServer

PROGRESS = {"step": 30, "totalSteps": 120, "epoch": 0.25, "percent": 25.0, "loss": 1.234567891, "etaSeconds": 301.6,
            "tokensPerSecond": 812.4, "trainedTokens": 61440, "deviceHours": 0.5, "checkpoints": [],
            "updatedAt": "2026-11-28T23:00:00Z"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path: Path):
    running = TrainerStatusServer(tmp_path / "tls").start()
    try:
        yield running
    finally:
        running.stop()


def reporter_for(server: TrainerStatusServer, tmp_path: Path, clock: Clock, namespace: str = "team-a",
                 name: str = "ftj-fpb-train") -> tuple[TrainerStatusReporter, Path]:
    token = tmp_path / "token"
    token.write_text(server.issue_token(namespace, name))
    reporter = TrainerStatusReporter.from_environ({URL_ENV: server.url(namespace, name), TOKEN_ENV: str(token),
                                                   CA_ENV: str(server.ca_file)})
    assert reporter is not None
    reporter.clock = clock
    return reporter, token


def test_progress_becomes_the_trainer_status_upstream_defines():
    body = trainer_status(PROGRESS)
    assert body == {"trainerStatus": {
        "progressPercentage": 25,
        "estimatedRemainingSeconds": 302,
        "metrics": [{"name": "loss", "value": "1.23457"}, {"name": "currentEpoch", "value": "0.25"},
                    {"name": "currentStep", "value": "30"}, {"name": "totalSteps", "value": "120"},
                    {"name": "tokensPerSecond", "value": "812.4"}, {"name": "trainedTokens", "value": "61440"}],
        "lastUpdatedTime": "2026-11-28T23:00:00Z",
    }}
    # Unknown values are left out rather than sent as nonsense; percentages stay within 0..100.
    sparse = trainer_status({"percent": 100.7, "loss": None, "etaSeconds": None, "updatedAt": "t"})["trainerStatus"]
    assert sparse == {"progressPercentage": 100, "lastUpdatedTime": "t"}


def test_reports_reach_the_trainjob_with_the_pods_token_and_ca(server, tmp_path):
    clock = Clock()
    reporter, token = reporter_for(server, tmp_path, clock)
    assert reporter.report(PROGRESS) is True
    assert server.received == [("team-a", "ftj-fpb-train", trainer_status(PROGRESS)["trainerStatus"])]
    # Within 5 s only the last report goes; later ones go again.
    assert reporter.report({**PROGRESS, "percent": 26.0}) is False
    assert reporter.report({**PROGRESS, "step": 120, "percent": 100.0}, final=True) is True
    clock.now += MIN_INTERVAL_SECONDS
    # The projected token rotates: every request reads the file again.
    token.write_text(server.issue_token("team-a", "ftj-fpb-train"))
    assert reporter.report({**PROGRESS, "percent": 30.0}) is True
    assert [status["progressPercentage"] for _, _, status in server.received] == [25, 100, 30]
    assert server.refused == []


def test_a_refused_report_never_stops_training_nor_shows_the_token(server, tmp_path, caplog):
    clock = Clock()
    # A token of another TrainJob: the server answers 403.
    reporter, token = reporter_for(server, tmp_path, clock, name="someone-else")
    reporter.url = server.url("team-a", "ftj-fpb-train")
    with caplog.at_level(logging.WARNING, logger="tessera.train.trainer_status"):
        assert reporter.report(PROGRESS) is False
        clock.now += MIN_INTERVAL_SECONDS  # the first failure waits 5 s
        assert reporter.report(PROGRESS) is False
        clock.now += MIN_INTERVAL_SECONDS  # the second one doubled the wait to 10 s: no request yet
        assert reporter.report(PROGRESS) is False
    assert server.refused == [403, 403]
    assert "HTTP 403 Forbidden" in caplog.text
    assert token.read_text() not in caplog.text


def test_an_untrusted_server_or_a_missing_token_is_a_warning_not_an_error(server, tmp_path, caplog):
    token = tmp_path / "token"
    token.write_text(server.issue_token("team-a", "job"))
    # No CA given: the system trust store does not know the controller's CA.
    untrusting = TrainerStatusReporter.from_environ({URL_ENV: server.url("team-a", "job"), TOKEN_ENV: str(token)})
    with caplog.at_level(logging.WARNING, logger="tessera.train.trainer_status"):
        assert untrusting.report(PROGRESS) is False
        token.unlink()
        missing = TrainerStatusReporter.from_environ({URL_ENV: server.url("team-a", "job"), TOKEN_ENV: str(token),
                                                      CA_ENV: str(server.ca_file)})
        assert missing.report(PROGRESS) is False
    assert server.received == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text and "FileNotFoundError" in caplog.text


def test_no_trainer_v2_environment_no_reporter(tmp_path):
    assert TrainerStatusReporter.from_environ({}) is None
    assert TrainerStatusReporter.from_environ({URL_ENV: "https://x"}) is None
    # The token never goes over plain HTTP.
    assert TrainerStatusReporter.from_environ({URL_ENV: "http://x/status", TOKEN_ENV: str(tmp_path / "t")}) is None
