"""Settings: FUSIONRANK_* environment variables, validated before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.schemas import RankRequest, RequestLimits, rank_request_model
from service.settings import Settings


def test_defaults_match_the_api() -> None:
    settings = Settings()
    assert settings.redis_url is None  # the embedded store
    assert settings.device == "auto" and settings.intra_op_threads == 1
    assert settings.request_limits == RequestLimits()
    assert rank_request_model(settings.request_limits) is RankRequest


def test_values_come_from_fusionrank_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSIONRANK_ARTIFACTS_DIR", "/srv/artifacts")
    monkeypatch.setenv("FUSIONRANK_REDIS_URL", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("FUSIONRANK_PORT", "9001")
    monkeypatch.setenv("FUSIONRANK_WORKERS", "2")
    monkeypatch.setenv("FUSIONRANK_BATCH_MAX_WAIT_US", "250")
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    monkeypatch.setenv("FUSIONRANK_QUERY_CACHE_SIZE", "0")
    settings = Settings()
    assert settings.artifacts_dir == Path("/srv/artifacts")
    assert settings.models_dir == Path("/srv/artifacts/models")
    assert settings.redis_url == "redis://127.0.0.1:6379/2"
    assert (settings.port, settings.workers) == (9001, 2)
    assert settings.batch_max_wait_us == 250
    assert settings.device == "cpu" and settings.query_cache_size == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": 0}, "port"),
        ({"workers": 0}, "workers"),
        ({"device": "tpu"}, "device"),
        ({"batch_max_wait_us": -1}, "batch_max_wait_us"),
        ({"batch_max_size": 1000}, "batch_max_size 1000 must be >= "),
        ({"max_top_k": 5}, "default_top_k 10 > max_top_k 5"),
        ({"batch_min_bucket": 4096}, "batch_min_bucket"),
        ({"admin_token": "x"}, "admin_token"),
    ],
)
def test_invalid_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_invalid_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSIONRANK_BATCH_MAX_SIZE", "lots")
    with pytest.raises(ValidationError, match="batch_max_size"):
        Settings()
