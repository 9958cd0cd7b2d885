"""Schema-driven fuzzing of every HTTP endpoint, against the live app's own OpenAPI spec.

Schemathesis reads ``/openapi.json`` from the running router and sends
requests that fit the schema and requests that do not (wrong types, missing
fields, odd strings, wrong content types). Every answer must be documented:
never a 500, a status the spec lists, the content type and body it describes,
and data that breaks the schema refused with a 4xx. Counts go to the fault report.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from loadtests.faults import FaultRow
from tests.integration.faults.conftest import CATEGORY

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]
EXAMPLES = 40  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _operations(drill) -> list:
    schema = schemathesis.openapi.from_url(f"{drill.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation, mode: GenerationMode, statuses: Counter) -> None:
    """Run the operation's generated cases, counting the statuses it answered with.

    A path naming a category gets the served one, so the body is what is fuzzed
    (random names are fuzzed too, and answer 404).
    """
    strategy = operation.as_strategy(generation_mode=mode)
    if "{category}" in operation.path:
        strategy = strategy | operation.as_strategy(
            generation_mode=mode, path_parameters={"category": CATEGORY}
        )

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        response = case.call(timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    try:
        fuzz()
    except Unsatisfiable:
        # Nothing to break: an operation without parameters or body has no
        # schema-violating request (GET /healthz, ...).
        if mode is not GenerationMode.NEGATIVE or operation.body or operation.query:
            raise


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_answers_as_documented(drill, fault_report, mode):
    operations = _operations(drill)
    names = {f"{o.method.upper()} {o.path}" for o in operations}
    assert {"POST /v1/inspect", "POST /v1/inspect/batch", "GET /v1/categories"} <= names, names
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"
        statuses: Counter = Counter()
        try:
            _fuzz(operation, mode, statuses)
        finally:
            if statuses:
                fault_report.append(
                    FaultRow(
                        f"schemathesis ({mode.value}): {name}",
                        tries=sum(statuses.values()),
                        requests=sum(statuses.values()),
                        failed=sum(n for status, n in statuses.items() if status >= 500),
                        extra={"statuses": dict(sorted(statuses.items()))},
                    )
                )
        if mode is GenerationMode.POSITIVE or operation.body:
            assert sum(statuses.values()) >= 1, name  # the fuzzer reached it
