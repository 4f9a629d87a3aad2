"""Bad input: schemathesis generates requests from the OpenAPI schema that a running
``python -m service`` serves (valid and invalid bodies, headers, paths), a bounded number per
operation; no answer may be a 5xx, and answers must match the documented status codes,
content types and response schemas."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the skip)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as schemathesis_checks  # noqa: E402

from tests.service.processes import ServiceProcess, running_service  # noqa: E402

MAX_EXAMPLES = 40  # per operation: the whole test stays within ~30 s on two cores
TOKEN = secrets.token_urlsafe(32)

CHECKS = [
    schemathesis_checks.not_a_server_error,
    schemathesis_checks.status_code_conformance,
    schemathesis_checks.content_type_conformance,
    schemathesis_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed_service(
    sample_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("fuzz") / "service.log"
    env = {
        "FUSIONRANK_ARTIFACTS_DIR": str(sample_artifacts),
        # The admin route is in the schema and fuzzed with the token: the reloads it asks for
        # name no version, or none that exists (200 no-op, 409, 422).
        "FUSIONRANK_ADMIN_TOKEN": TOKEN,
        "FUSIONRANK_REQUEST_TIMEOUT_S": "10",  # a 503 here would be a slow machine, not input
    }
    with running_service(log, **env) as service:
        yield service


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_a_server_error(fuzzed_service: ServiceProcess, mode: str) -> None:
    # schemathesis' own pytest plugin (schema.parametrize) does not run under pytest 9, so
    # each operation's examples are drawn here with Hypothesis directly.
    schema = schemathesis.openapi.from_url(f"{fuzzed_service.url}/openapi.json")
    failures, calls = [], Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz(operation, GenerationMode(mode), fuzzed_service.url, calls)
        except Unsatisfiable:  # no invalid request exists (no parameters, or free strings)
            assert mode == "negative", operation.label
        except Exception as exc:  # every operation is fuzzed, then all failures are shown
            failures.append(f"{operation.label}: {exc}")
    print(f"\nschemathesis {mode}: {dict(sorted(calls.items()))}")
    assert calls, "the schema has operations"
    assert not [key for key in calls if key[1] >= 500]
    assert not failures, "\n\n".join(failures)


def fuzz(operation, mode: GenerationMode, url: str, calls: Counter) -> None:  # noqa: ANN001
    """Call ``operation`` with up to MAX_EXAMPLES generated requests; raise on a failed check."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report what was found
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same examples every run
        database=None,
    )
    def call(case) -> None:  # noqa: ANN001 (a schemathesis Case)
        response = case.call_and_validate(
            base_url=url, checks=CHECKS, timeout=30, headers={"authorization": f"Bearer {TOKEN}"}
        )
        calls[(operation.label, response.status_code)] += 1

    call()


@pytest.mark.slow
def test_oversized_and_unknown_bodies_are_refused(fuzzed_service: ServiceProcess) -> None:
    limit = 1 << 20  # max_body_bytes' default
    big = b'{"query": "q", "candidate_ids": ["' + b"x" * (limit + 10) + b'"]}'

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    with httpx.Client(base_url=fuzzed_service.url, timeout=30) as client:
        declared = client.post("/rank", content=big, headers={"content-type": "application/json"})
        streamed = client.post(
            "/rank", content=chunks(), headers={"content-type": "application/json"}
        )
        unknown = client.post("/rank", json={"query": "red shirt", "top_k": 3, "debug": True})
    assert declared.status_code == 413 and str(limit) in declared.json()["detail"]
    assert streamed.status_code == 413
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "debug"]
    assert unknown.json()["detail"][0]["type"] == "extra_forbidden"
