"""Property-based fuzzing of every operation in the served OpenAPI document.

Schemathesis reads /schema/openapi.json from a real server and sends requests
made from it, valid and invalid (bounded in number). Every answer must be free
of 5xx, match its documented status and schema, and, when it is a 4xx, carry
an `error`.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from appliance.accounts import accounts, audit, keys
from appliance.core.database import ConnectionPool

from .serve_process import ServeProcess, write_config

pytestmark = pytest.mark.system

EXAMPLES_PER_OPERATION = 30
requests_sent: list[str] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model, launcher):
    folder = tmp_path_factory.mktemp("fuzz")
    # Small bounds keep what valid requests cost the CPU small; few credits
    # mean most valid requests end at 402 once they are spent.
    config = write_config(folder, tiny_model,
                          generation={"max_size": 128, "max_steps": 4},
                          limits={"max_prompts_per_request": 3, "requests_per_minute_per_key": 0},
                          openai={"wait_timeout": 120.0})
    process = ServeProcess(config, folder / "serve.log", launcher).start()
    database = ConnectionPool(folder / "data" / "appliance.db")
    account = accounts.create_account(database.db(), "fuzz@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=12)
    key = keys.create_key(database.db(), account.id, "Fuzz", audit.Actor.cli())[1]
    yield process, key
    database.close()
    process.stop()
    print(f"\nfuzz: {len(requests_sent)} requests sent: "
          + ", ".join(f"{n} {op}" for op, n in sorted(_tally().items())))


def _tally() -> dict[str, int]:
    counts: dict[str, int] = {}
    for operation in requests_sent:
        counts[operation] = counts.get(operation, 0) + 1
    return counts


def every_4xx_has_an_error_sentence(ctx, response, case) -> None:
    if 400 <= response.status_code < 500:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"a {response.status_code} without a JSON body") from None
        error = body.get("error") if isinstance(body, dict) else None
        # The /v1 API answers in OpenAI's shape: error.message holds the sentence.
        sentence = error.get("message") if isinstance(error, dict) else error
        assert isinstance(sentence, str) and sentence.strip(), \
            f"a {response.status_code} without an `error` sentence: {body}"


def test_the_served_api_answers_every_generated_request_as_documented(fuzz_server):
    # Driven by hand rather than by schemathesis' pytest plugin, whose lazy
    # loading (needed for a schema served by a fixture) does not run on pytest 9.
    process, key = fuzz_server
    schema = schemathesis.openapi.from_url(f"{process.url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /api/playground/images", "GET /api/playground/images/{job_id}",
            "GET /api/playground/images/{job_id}/images/{index}"} <= labels, labels

    failures = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, key)
            except Exception as failure:  # noqa: BLE001 - every operation gets its turn
                failures[f"{operation.label} ({mode.value})"] = failure
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())


def fuzz(operation, mode: GenerationMode, key: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        requests_sent.append(f"{case.method} {case.path}")
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, timeout=150,
                               additional_checks=[every_4xx_has_an_error_sentence],
                               # Schema-valid requests may rightly be refused: the limits
                               # come from config.toml and the balance from the account.
                               excluded_checks=[positive_data_acceptance])

    run()
