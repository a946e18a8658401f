"""Row checks: what becomes a request, what is rejected and why, what refuses the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.config import Job, load_job
from runner.errors import ConfigError
from runner.records import InputRow, Rejection, Request
from runner.validate import Validator
from tests.conftest import JobWriter


@pytest.fixture
def job(write_job: JobWriter) -> Job:
    return load_job(
        write_job(
            Path("in.jsonl"),
            defaults='model = "deepseek-v3.2"\nmax_tokens = 100\nsystem = "Be brief."',
            tenants={"acme": {"tpm": 1000}, "globex": {"allowed_models": ["deepseek-v3.2"]}},
        )
    )


def check(job: Job, fields: dict[str, Any], problem: str | None = None) -> Request | Rejection:
    return Validator(job, job.price_table()).check(InputRow(7, "in.jsonl:8", fields, problem))


def test_a_prompt_row_becomes_a_request_with_defaults_and_system(job: Job) -> None:
    request = check(job, {"id": 81, "prompt": "Hi there"})
    assert isinstance(request, Request)
    assert request.row_id == "81" and request.tenant == "acme" and request.model == "deepseek-v3.2"
    assert request.body == {
        "model": "deepseek-v3.2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        "max_tokens": 100,
    }
    assert request.tpm_cost == request.prompt_tokens_estimate + 100


def test_turns_become_consecutive_user_messages(job: Job) -> None:
    request = check(job, {"id": 1, "prompt": ["first", "second"], "system": "Sys"})
    assert isinstance(request, Request)
    assert [m["content"] for m in request.body["messages"]] == ["Sys", "first", "second"]


def test_a_row_without_an_id_is_named_by_its_position(job: Job) -> None:
    assert check(job, {"prompt": "x"}).row_id == "row-8"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            {"prompt": "x", "max_tokens": "ten"},
            "'max_tokens' must be a positive integer, not 'ten'",
        ),
        ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be a positive integer, not 0"),
        ({"messages": "hello"}, "'messages' must be a non-empty list, not str"),
        ({"messages": [{"content": "x"}]}, "messages[0] has role None"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content must be text or parts, not int",
        ),
        ({}, "missing 'prompt' (or 'messages')"),
        ({"prompt": ""}, "'prompt' must be a non-empty string or list of strings, not str"),
        ({"prompt": "x", "temperature": 3}, "'temperature' must be between 0 and 2, not 3"),
        ({"prompt": "x", "tenant": "umbrella"}, "unknown tenant 'umbrella' (known: acme, globex)"),
        ({"prompt": "x", "model": 42}, "'model' must be a non-empty string, not int"),
        ({"prompt": "x", "tenant": 0}, "'tenant' must be a string, not int"),
        ({"prompt": "x", "tenant": False}, "'tenant' must be a string, not bool"),
        ({"prompt": "x", "id": {"a": 1}}, "the id must be a string or an integer, not dict"),
        (
            {"prompt": "x", "model": "gpt-4.1", "tenant": "globex"},
            "model 'gpt-4.1' is not allowed for tenant 'globex' (allowed: deepseek-v3.2)",
        ),
    ],
)
def test_malformed_rows_are_rejected_with_the_reason(
    job: Job, fields: dict[str, Any], problem: str
) -> None:
    rejection = check(job, fields)
    assert isinstance(rejection, Rejection)
    assert rejection.error == f"in.jsonl:8: {problem}"
    assert rejection.where == "in.jsonl:8"


def test_a_row_a_reader_could_not_parse_is_rejected_with_the_readers_reason(job: Job) -> None:
    rejection = check(job, {}, problem="not valid JSON: Expecting value at column 1")
    assert isinstance(rejection, Rejection)
    assert rejection.error == "in.jsonl:8: not valid JSON: Expecting value at column 1"


def test_a_row_that_could_never_fit_its_tenants_tpm_is_rejected(job: Job) -> None:
    rejection = check(job, {"prompt": "word " * 600, "max_tokens": 500})
    assert isinstance(rejection, Rejection)
    assert "but tenant 'acme' allows 1000 per minute" in rejection.error
    assert isinstance(check(job, {"prompt": "word " * 600, "tenant": "globex"}), Request)


def test_an_unpriced_model_refuses_the_whole_submit_naming_model_and_row(job: Job) -> None:
    with pytest.raises(
        ConfigError, match=r'in.jsonl:8: model \'mystery\' has no price; add \[prices."mystery"\]'
    ):
        check(job, {"prompt": "x", "model": "mystery"})


def batch(body: Any, **extra: Any) -> dict[str, Any]:
    return {
        "batch": True,
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
        **extra,
    }


def test_a_batch_line_keeps_its_body_and_max_completion_tokens(job: Job) -> None:
    body = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 50,
        "seed": 3,
    }
    request = check(job, batch(body, tenant="acme"))
    assert isinstance(request, Request)
    assert (request.row_id, request.tenant, request.max_tokens) == ("r1", "acme", 50)
    assert request.body == body


def test_a_batch_line_without_a_token_limit_gets_the_jobs_default(job: Job) -> None:
    request = check(job, batch({"messages": [{"role": "user", "content": "hi"}]}))
    assert isinstance(request, Request)
    assert request.body["max_tokens"] == 100 and request.body["model"] == "deepseek-v3.2"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (batch({"messages": []}), "'messages' must be a non-empty list, not list"),
        (batch("text"), "'body' must be an object, not str"),
        (batch({}, method="GET"), "method 'GET': only POST is supported"),
        (
            batch({}, url="/v1/embeddings"),
            "url '/v1/embeddings': only /v1/chat/completions is supported",
        ),
        ({"batch": True, "body": {}}, "missing 'custom_id'"),
    ],
)
def test_bad_batch_lines_are_rejected(job: Job, fields: dict[str, Any], problem: str) -> None:
    rejection = check(job, fields)
    assert isinstance(rejection, Rejection)
    assert rejection.error == f"in.jsonl:8: {problem}"
