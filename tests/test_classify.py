"""Classification of provider errors: every category, every provider shape, every wait source."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayrace import Category, Failure, classify
from relayrace._failure import parse_rate_limit_reset, parse_retry_after

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NOW_HTTP_DATE = "Tue, 14 Nov 2023 22:13:20 GMT"


def openai(code: str | None, type_: str, message: str = "boom") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def anthropic(type_: str, message: str = "boom") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def gemini(code: int, status: str, message: str = "boom", details: list[Any] | None = None):
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def quota_failure(*quota_ids: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "m", "quotaId": quota_id} for quota_id in quota_ids],
    }


def retry_info(delay: Any) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


OPENAI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes."
)
OPENAI_RATE_MESSAGE = (
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Used 29000, Requested 2000. Please try again in 2s. You can increase your rate limit by "
    "adding a payment method to your account at https://platform.openai.com/account/billing."
)
GEMINI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_"
    "requests, limit: 20, model: gemini-2.5-flash\nPlease retry in 58.821668433s."
)

# (id, status, body, category, code)
CASES: list[tuple[str, int | None, Any, Category, str | None]] = [
    # --- OpenAI -------------------------------------------------------------------------------
    (
        "openai-rate-limit",
        429,
        openai("rate_limit_exceeded", "tokens", OPENAI_RATE_MESSAGE),
        Category.RATE_LIMIT,
        "rate_limit_exceeded",
    ),
    (
        "openai-insufficient-quota",
        429,
        openai("insufficient_quota", "insufficient_quota", OPENAI_QUOTA_MESSAGE),
        Category.QUOTA_EXHAUSTED,
        "insufficient_quota",
    ),
    (
        "openai-billing-hard-limit",
        429,
        openai("billing_hard_limit_reached", "invalid_request_error"),
        Category.QUOTA_EXHAUSTED,
        "billing_hard_limit_reached",
    ),
    (
        "openai-context-length",
        400,
        openai(
            "context_length_exceeded",
            "invalid_request_error",
            "This model's maximum context length is 8192 tokens.",
        ),
        Category.CONTEXT_LENGTH,
        "context_length_exceeded",
    ),
    (
        "openai-model-not-found",
        404,
        openai("model_not_found", "invalid_request_error", "The model `gpt-9` does not exist"),
        Category.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "openai-invalid-api-key",
        401,
        openai("invalid_api_key", "invalid_request_error", "Incorrect API key provided"),
        Category.AUTH,
        "invalid_api_key",
    ),
    (
        "openai-content-filter",
        400,
        openai("content_filter", "invalid_request_error"),
        Category.CONTENT_POLICY,
        "content_filter",
    ),
    (
        "openai-content-policy-violation",
        400,
        openai("content_policy_violation", "invalid_request_error"),
        Category.CONTENT_POLICY,
        "content_policy_violation",
    ),
    (
        "azure-content-filter-innererror",
        400,
        {
            "error": {
                "message": "The response was filtered",
                "code": "content_filter",
                "innererror": {"code": "ResponsibleAIPolicyViolation"},
            }
        },
        Category.CONTENT_POLICY,
        "ResponsibleAIPolicyViolation",
    ),
    (
        "openai-content-policy-by-message",
        400,
        openai(
            "invalid_prompt",
            "invalid_request_error",
            "Your request was rejected as a result of our content management policy.",
        ),
        Category.CONTENT_POLICY,
        "invalid_prompt",
    ),
    (
        "openai-server-error",
        500,
        openai(None, "server_error", "The server had an error while processing your request."),
        Category.PROVIDER_5XX,
        "server_error",
    ),
    (
        "openai-server-overloaded",
        503,
        openai(None, "server_error", "That model is currently overloaded with other requests."),
        Category.OVERLOADED,
        "server_error",
    ),
    (
        "openai-unknown-param",
        400,
        openai("unknown_parameter", "invalid_request_error", "Unknown parameter: 'foo'."),
        Category.BAD_REQUEST,
        "unknown_parameter",
    ),
    (
        "openai-generic-type-defers-to-404",
        404,
        openai(None, "invalid_request_error", "Invalid URL (POST /v1/chat/completion)"),
        Category.MODEL_NOT_FOUND,
        "invalid_request_error",
    ),
    (
        "openai-unsupported-region",
        403,
        openai("unsupported_country_region_territory", "request_forbidden"),
        Category.AUTH,
        "unsupported_country_region_territory",
    ),
    # --- Anthropic ----------------------------------------------------------------------------
    (
        "anthropic-rate-limit",
        429,
        anthropic("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
        Category.RATE_LIMIT,
        "rate_limit_error",
    ),
    (
        "anthropic-spend-limit",
        429,
        {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "You have reached your monthly spend limit.",
                "details": {"error_code": "enforced_spend_limit_reached"},
            },
        },
        Category.QUOTA_EXHAUSTED,
        "enforced_spend_limit_reached",
    ),
    (
        "anthropic-credit-balance",
        400,
        anthropic(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
        ),
        Category.QUOTA_EXHAUSTED,
        "invalid_request_error",
    ),
    (
        "anthropic-billing-error",
        402,
        anthropic("billing_error"),
        Category.QUOTA_EXHAUSTED,
        "billing_error",
    ),
    (
        "anthropic-overloaded",
        529,
        anthropic("overloaded_error", "Overloaded"),
        Category.OVERLOADED,
        "overloaded_error",
    ),
    (
        "anthropic-auth",
        401,
        anthropic("authentication_error", "invalid x-api-key"),
        Category.AUTH,
        "authentication_error",
    ),
    (
        "anthropic-permission",
        403,
        anthropic("permission_error"),
        Category.AUTH,
        "permission_error",
    ),
    (
        "anthropic-not-found",
        404,
        anthropic("not_found_error", "model: claude-9"),
        Category.MODEL_NOT_FOUND,
        "not_found_error",
    ),
    (
        "anthropic-prompt-too-long",
        400,
        anthropic("invalid_request_error", "prompt is too long: 208000 tokens > 200000 maximum"),
        Category.CONTEXT_LENGTH,
        "invalid_request_error",
    ),
    (
        "anthropic-context-limit",
        400,
        anthropic(
            "invalid_request_error",
            "input length and `max_tokens` exceed context limit: 197626 + 8192 > 200000",
        ),
        Category.CONTEXT_LENGTH,
        "invalid_request_error",
    ),
    (
        "anthropic-bad-request",
        400,
        anthropic("invalid_request_error", "messages: roles must alternate"),
        Category.BAD_REQUEST,
        "invalid_request_error",
    ),
    (
        "anthropic-max-tokens-is-not-context",
        400,
        anthropic(
            "invalid_request_error",
            "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens",
        ),
        Category.BAD_REQUEST,
        "invalid_request_error",
    ),
    (
        "anthropic-request-too-large",
        413,
        anthropic("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        Category.BAD_REQUEST,
        "request_too_large",
    ),
    (
        "anthropic-api-error",
        500,
        anthropic("api_error", "Internal server error"),
        Category.PROVIDER_5XX,
        "api_error",
    ),
    (
        "anthropic-timeout-error",
        504,
        anthropic("timeout_error"),
        Category.TIMEOUT,
        "timeout_error",
    ),
    # --- Gemini -------------------------------------------------------------------------------
    (
        "gemini-rate-limit-per-minute",
        429,
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            GEMINI_QUOTA_MESSAGE,
            [quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")],
        ),
        Category.RATE_LIMIT,
        "RESOURCE_EXHAUSTED",
    ),
    (
        "gemini-no-details",
        429,
        gemini(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
        Category.RATE_LIMIT,
        "RESOURCE_EXHAUSTED",
    ),
    (
        "gemini-daily-quota",
        429,
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            GEMINI_QUOTA_MESSAGE,
            [
                quota_failure(
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                )
            ],
        ),
        Category.QUOTA_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
    ),
    (
        "gemini-zero-limit",
        429,
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for metric: free_tier_requests, limit: 0, model: gemini-3-pro",
        ),
        Category.QUOTA_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
    ),
    (
        "gemini-overloaded",
        503,
        gemini(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        Category.OVERLOADED,
        "UNAVAILABLE",
    ),
    (
        "gemini-unavailable",
        503,
        gemini(503, "UNAVAILABLE", "The service is currently unavailable."),
        Category.PROVIDER_5XX,
        "UNAVAILABLE",
    ),
    (
        "gemini-internal",
        500,
        gemini(500, "INTERNAL", "An internal error has occurred."),
        Category.PROVIDER_5XX,
        "INTERNAL",
    ),
    (
        "gemini-deadline",
        504,
        gemini(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        Category.TIMEOUT,
        "DEADLINE_EXCEEDED",
    ),
    (
        "gemini-invalid-argument",
        400,
        gemini(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
        Category.BAD_REQUEST,
        "INVALID_ARGUMENT",
    ),
    (
        "gemini-token-count",
        400,
        gemini(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        ),
        Category.CONTEXT_LENGTH,
        "INVALID_ARGUMENT",
    ),
    (
        "gemini-bad-key",
        400,
        gemini(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        ),
        Category.AUTH,
        "API_KEY_INVALID",
    ),
    (
        "gemini-billing-precondition",
        400,
        gemini(
            400,
            "FAILED_PRECONDITION",
            "Gemini API free tier is not available in your country. Please enable billing.",
        ),
        Category.QUOTA_EXHAUSTED,
        "FAILED_PRECONDITION",
    ),
    (
        "gemini-permission-denied",
        403,
        gemini(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
        Category.AUTH,
        "PERMISSION_DENIED",
    ),
    (
        "gemini-unauthenticated",
        401,
        gemini(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        Category.AUTH,
        "UNAUTHENTICATED",
    ),
    (
        "gemini-not-found",
        404,
        gemini(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta"),
        Category.MODEL_NOT_FOUND,
        "NOT_FOUND",
    ),
    (
        "gemini-array-wrapped",
        429,
        [gemini(429, "RESOURCE_EXHAUSTED", "Resource exhausted. Please try again later.")],
        Category.RATE_LIMIT,
        "RESOURCE_EXHAUSTED",
    ),
    (
        "gemini-wrapped-in-sdk-error",
        429,
        {
            "error": {
                "message": json.dumps(
                    gemini(429, "RESOURCE_EXHAUSTED", "limit: 0, model: gemini-3-pro"), indent=2
                ),
                "code": 429,
                "status": "Too Many Requests",
            }
        },
        Category.QUOTA_EXHAUSTED,
        "RESOURCE_EXHAUSTED",
    ),
    # --- the body decides before the status ---------------------------------------------------
    (
        "body-beats-status",
        500,
        anthropic("rate_limit_error"),
        Category.RATE_LIMIT,
        "rate_limit_error",
    ),
    # --- status only --------------------------------------------------------------------------
    ("status-400", 400, None, Category.BAD_REQUEST, None),
    ("status-401", 401, None, Category.AUTH, None),
    ("status-402", 402, None, Category.QUOTA_EXHAUSTED, None),
    ("status-403", 403, None, Category.AUTH, None),
    ("status-404", 404, None, Category.MODEL_NOT_FOUND, None),
    ("status-408", 408, None, Category.TIMEOUT, None),
    ("status-413", 413, None, Category.BAD_REQUEST, None),
    ("status-422", 422, None, Category.BAD_REQUEST, None),
    ("status-429", 429, None, Category.RATE_LIMIT, None),
    ("status-500", 500, None, Category.PROVIDER_5XX, None),
    ("status-502", 502, None, Category.PROVIDER_5XX, None),
    ("status-503", 503, None, Category.PROVIDER_5XX, None),
    ("status-504", 504, None, Category.PROVIDER_5XX, None),
    ("status-529", 529, None, Category.OVERLOADED, None),
    ("status-409", 409, None, Category.UNKNOWN, None),
    ("status-418", 418, None, Category.UNKNOWN, None),
    ("status-none-body-none", None, None, Category.UNKNOWN, None),
    # --- raw text bodies ----------------------------------------------------------------------
    ("text-503-overloaded", 503, "upstream overloaded, try later", Category.OVERLOADED, None),
    ("text-502-html", 502, "<html><body>Bad Gateway</body></html>", Category.PROVIDER_5XX, None),
    (
        "text-429-quota",
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        Category.QUOTA_EXHAUSTED,
        None,
    ),
    (
        "text-json",
        429,
        json.dumps(openai("insufficient_quota", "insufficient_quota")),
        Category.QUOTA_EXHAUSTED,
        "insufficient_quota",
    ),
    ("text-broken-json", 400, '{"error": {"type": "inval', Category.BAD_REQUEST, None),
    (
        "bytes-json",
        529,
        json.dumps(anthropic("overloaded_error")).encode(),
        Category.OVERLOADED,
        "overloaded_error",
    ),
    (
        "gateway-detail",
        404,
        {"detail": "Not Found"},
        Category.MODEL_NOT_FOUND,
        None,
    ),
    # --- errors inside a 200 stream -----------------------------------------------------------
    (
        "stream-anthropic-sse-event",
        None,
        'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
        '"message": "Overloaded"}}\n\n',
        Category.OVERLOADED,
        "overloaded_error",
    ),
    (
        "stream-anthropic-event-dict",
        None,
        anthropic("api_error", "Internal server error"),
        Category.PROVIDER_5XX,
        "api_error",
    ),
    (
        "stream-openai-error-chunk",
        None,
        "data: " + json.dumps(openai("rate_limit_exceeded", "requests")),
        Category.RATE_LIMIT,
        "rate_limit_exceeded",
    ),
    (
        "stream-openai-responses-error",
        None,
        {"type": "error", "code": "insufficient_quota", "message": "quota", "param": None},
        Category.QUOTA_EXHAUSTED,
        "insufficient_quota",
    ),
    (
        "stream-openai-responses-failed",
        None,
        {
            "type": "response.failed",
            "response": {"error": {"code": "server_error", "message": "oops"}},
        },
        Category.PROVIDER_5XX,
        "server_error",
    ),
    (
        "stream-unrecognised-error",
        None,
        {"error": {"message": "something odd", "type": "weird_error"}},
        Category.STREAM_ERROR,
        "weird_error",
    ),
    ("stream-raw-text", None, "connection hiccup", Category.STREAM_ERROR, None),
    (
        "stream-generic-invalid-request",
        None,
        anthropic("invalid_request_error", "prompt is too long: 300000 tokens > 200000 maximum"),
        Category.CONTEXT_LENGTH,
        "invalid_request_error",
    ),
    (
        "stream-error-in-a-200",
        200,
        {"error": {"message": "x", "type": "overloaded_error"}},
        Category.OVERLOADED,
        "overloaded_error",
    ),
    (
        "stream-openai-finish-content-filter",
        None,
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]},
        Category.CONTENT_POLICY,
        "content_filter",
    ),
    (
        "stream-gemini-block-reason",
        None,
        {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}},
        Category.CONTENT_POLICY,
        "SAFETY",
    ),
    (
        "stream-gemini-finish-safety",
        200,
        {"candidates": [{"content": {"parts": []}, "finishReason": "SAFETY", "index": 0}]},
        Category.CONTENT_POLICY,
        "SAFETY",
    ),
    (
        "stream-gemini-sse-prohibited",
        None,
        'data: {"candidates": [{"finishReason": "PROHIBITED_CONTENT"}]}\r\n\r\n',
        Category.CONTENT_POLICY,
        "PROHIBITED_CONTENT",
    ),
    (
        "stream-anthropic-refusal",
        None,
        {"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {}},
        Category.CONTENT_POLICY,
        "refusal",
    ),
    (
        "stream-gemini-normal-stop-is-not-blocked",
        None,
        {"candidates": [{"finishReason": "STOP"}]},
        Category.UNKNOWN,
        None,
    ),
]


@pytest.mark.parametrize(
    ("status", "body", "category", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_classify_table(status: int | None, body: Any, category: Category, code: str | None):
    failure = classify(status=status, body=body, provider="p1", now=NOW)
    assert failure.category is category
    assert failure.code == code
    assert failure.status == status
    assert failure.provider == "p1"


def test_every_provider_category_is_reachable():
    # LOCAL_CAPACITY, CANCELLED, NETWORK are our own side's failures, never a provider's answer.
    provider_side = set(Category) - {Category.LOCAL_CAPACITY, Category.CANCELLED, Category.NETWORK}
    assert {case[3] for case in CASES} == provider_side


def test_message_is_the_providers_and_is_redacted():
    failure = classify(
        status=401,
        body=openai(
            "invalid_api_key",
            "invalid_request_error",
            "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz123456. Find yours.",
        ),
    )
    assert failure.message == "Incorrect API key provided: [REDACTED]. Find yours."


def test_message_redacts_given_secrets():
    failure = classify(status=400, body="bad key mysecretvalue", secrets=["mysecretvalue"])
    assert failure.message == "bad key [REDACTED]"


def test_message_is_truncated():
    failure = classify(status=400, body=anthropic("invalid_request_error", "x" * 5000))
    assert len(failure.message) == 500
    assert failure.message.endswith("...")


def test_message_falls_back_to_the_status():
    assert classify(status=503).message == "HTTP 503"
    assert classify().message == ""


def test_blocked_messages_name_the_reason():
    blocked = {"promptFeedback": {"blockReason": "OTHER", "blockReasonMessage": "nope"}}
    assert classify(body=blocked).message == "nope"
    assert "SAFETY" in classify(body={"candidates": [{"finishReason": "SAFETY"}]}).message


def test_non_int_status_is_ignored():
    failure = classify(status=True, body=None)  # type: ignore[arg-type]
    assert failure.status is None
    assert failure.category is Category.UNKNOWN


# --- retry-after ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms"),
        pytest.param({"Retry-After-Ms": "250.5", "Retry-After": "9"}, 0.2505, id="ms-first"),
        pytest.param({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0, id="bad-ms-ignored"),
        pytest.param({"Retry-After": "30"}, 30.0, id="seconds"),
        pytest.param({"RETRY-AFTER": " 2.5 "}, 2.5, id="fractional-any-case"),
        pytest.param({"retry-after": "Tue, 14 Nov 2023 22:14:05 GMT"}, 45.0, id="http-date"),
        pytest.param({"retry-after": "Tue, 14 Nov 2023 22:14:05 +0000"}, 45.0, id="date-offset"),
        pytest.param({"retry-after": "Tue, 14 Nov 2023 23:14:05 +0100"}, 45.0, id="date-tz"),
        pytest.param({"retry-after": "Tue, 14 Nov 2023 22:00:00 GMT"}, 0.0, id="past-clamped"),
        pytest.param({"retry-after": NOW_HTTP_DATE}, 0.0, id="date-now"),
        pytest.param({"retry-after": "-5"}, None, id="negative"),
        pytest.param({"retry-after": "nan"}, None, id="nan"),
        pytest.param({"retry-after": "inf"}, None, id="inf"),
        pytest.param({"retry-after": "1e3"}, None, id="exponent"),
        pytest.param({"retry-after": "9" * 400}, None, id="overflow"),
        pytest.param({"retry-after": "Mon, 99 Foo 2023 99:99:99 GMT"}, None, id="bad-date"),
        pytest.param({"retry-after": ""}, None, id="empty"),
        pytest.param({}, None, id="none"),
        pytest.param({"x-ratelimit-reset-requests": "1s"}, None, id="reset-not-read"),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None):
    assert parse_retry_after(headers, NOW) == expected


def test_parse_retry_after_defaults_to_the_wall_clock():
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 1970 00:00:10 GMT"}) == 0.0
    assert 0 < parse_retry_after({"retry-after": "Fri, 01 Jan 2100 00:00:00 GMT"})  # type: ignore[operator]
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"x-ratelimit-reset-requests": "1s"}, 1.0, id="openai-s"),
        pytest.param({"x-ratelimit-reset-requests": "20ms"}, 0.02, id="openai-ms"),
        pytest.param({"x-ratelimit-reset-tokens": "6m0s"}, 360.0, id="openai-m-s"),
        pytest.param({"x-ratelimit-reset-tokens": "1h2m3.5s"}, 3723.5, id="openai-h-m-s"),
        pytest.param(
            {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"},
            360.0,
            id="openai-latest-when-unknown",
        ),
        pytest.param(
            {
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-tokens": "5000",
            },
            1.0,
            id="openai-spent-limit-wins",
        ),
        pytest.param({"x-ratelimit-reset-tokens": "soon"}, None, id="openai-garbage"),
        pytest.param({"x-ratelimit-reset-tokens": "5"}, None, id="openai-no-unit"),
        pytest.param({"x-ratelimit-reset-tokens": "1x"}, None, id="openai-bad-unit"),
        pytest.param(
            {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:50Z"}, 30.0, id="anthropic"
        ),
        pytest.param(
            {"anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:21.500000+00:00"},
            1.5,
            id="anthropic-fraction-offset",
        ),
        pytest.param(
            {"anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:00:00Z"},
            0.0,
            id="anthropic-past-clamped",
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:30Z",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:14:20Z",
                "anthropic-ratelimit-output-tokens-remaining": "100",
            },
            10.0,
            id="anthropic-spent-limit-wins",
        ),
        pytest.param({"anthropic-ratelimit-tokens-reset": "tomorrow"}, None, id="anthr-garbage"),
        pytest.param({}, None, id="none"),
    ],
)
def test_parse_rate_limit_reset(headers: dict[str, str], expected: float | None):
    assert parse_rate_limit_reset(headers, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        pytest.param(429, None, {"retry-after-ms": "1500", "retry-after": "9"}, 1.5, id="ms"),
        pytest.param(429, None, {"Retry-After": "9"}, 9.0, id="seconds"),
        pytest.param(
            429,
            None,
            {"retry-after": "Tue, 14 Nov 2023 22:15:00 GMT"},
            100.0,
            id="http-date",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info("36.429760048s")]),
            {},
            36.429760048,
            id="gemini-retry-delay",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info({"seconds": "x", "nanos": 1})]),
            {},
            None,
            id="gemini-retry-delay-bad-object",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info({"seconds": "3", "nanos": 1})]),
            {},
            3.000000001,
            id="gemini-retry-delay-object",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info("soon")]),
            {},
            None,
            id="gemini-retry-delay-garbage",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info("30s")]),
            {"retry-after": "5"},
            5.0,
            id="header-beats-retry-delay",
        ),
        pytest.param(
            429,
            gemini(429, "RESOURCE_EXHAUSTED", details=[retry_info("30s")]),
            {"x-ratelimit-reset-tokens": "1m"},
            30.0,
            id="retry-delay-beats-reset",
        ),
        pytest.param(
            429, None, {"x-ratelimit-reset-tokens": "1m"}, 60.0, id="reset-for-rate-limit"
        ),
        pytest.param(
            529,
            None,
            {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25Z"},
            5.0,
            id="reset-for-overloaded",
        ),
        pytest.param(500, None, {"x-ratelimit-reset-tokens": "1m"}, None, id="no-reset-for-5xx"),
        pytest.param(
            429,
            openai("insufficient_quota", "insufficient_quota"),
            {"x-ratelimit-reset-tokens": "1m"},
            None,
            id="no-reset-for-quota",
        ),
        pytest.param(503, None, {"retry-after": "7"}, 7.0, id="retry-after-on-any-category"),
        pytest.param(429, None, {"retry-after": "garbage"}, None, id="garbage"),
    ],
)
def test_classify_retry_after(
    status: int, body: Any, headers: dict[str, str], expected: float | None
):
    failure = classify(status=status, body=body, headers=headers, now=NOW)
    assert failure.retry_after == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), (" TRUE ", True), ("False", False), ("maybe", None)],
)
def test_should_retry_header(value: str, expected: bool | None):
    assert classify(status=500, headers={"X-Should-Retry": value}).should_retry is expected


def test_should_retry_absent():
    assert classify(status=500, headers={"retry-after": "1"}).should_retry is None


# --- never raises -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
known_keys = st.sampled_from(
    [
        "error",
        "type",
        "code",
        "message",
        "status",
        "details",
        "error_code",
        "innererror",
        "retryDelay",
        "violations",
        "quotaId",
        "reason",
        "promptFeedback",
        "blockReason",
        "blockReasonMessage",
        "candidates",
        "finishReason",
        "choices",
        "finish_reason",
        "delta",
        "stop_reason",
        "response",
        "detail",
        "seconds",
        "nanos",
    ]
)
known_values = st.sampled_from(
    [
        "error",
        "response.failed",
        "refusal",
        "content_filter",
        "SAFETY",
        "RESOURCE_EXHAUSTED",
        "invalid_request_error",
        "rate_limit_error",
        "30s",
        "-1s",
        "9" * 400 + "s",
        "PerDay",
        '{"error": {"status": "RESOURCE_EXHAUSTED"}}',
        "[" * 5000,
        "1" * 5000,
    ]
)
shaped_values = st.recursive(
    json_values | known_values,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(known_keys | st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)
bodies = (
    shaped_values
    | shaped_values.map(json.dumps)
    | shaped_values.map(lambda value: "event: error\ndata: " + json.dumps(value))
    | st.text()
    | st.binary(max_size=50)
)
header_names = st.sampled_from(
    [
        "retry-after",
        "Retry-After",
        "retry-after-ms",
        "x-should-retry",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-tokens-remaining",
    ]
)
header_values = (
    st.text(max_size=40)
    | st.sampled_from(["0", "1.5", "1h2m3s", "9" * 400, "Tue, 14 Nov 2023 22:14:05 GMT"])
    | st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "NaN"])
    | st.sampled_from(["Mon, 01 Jan 0001 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 -1200"])
)
header_dicts = st.dictionaries(header_names | st.text(max_size=10), header_values, max_size=6)


@given(
    status=st.none() | st.integers() | st.sampled_from([200, 400, 429, 500, 503, 529]),
    body=bodies,
    headers=st.none() | header_dicts,
    now=st.none() | st.floats(),
)
def test_classify_never_raises(status: int | None, body: Any, headers: Any, now: float | None):
    failure = classify(status=status, body=body, headers=headers, provider="p", now=now)
    assert isinstance(failure, Failure)
    assert isinstance(failure.category, Category)
    assert failure.code is None or isinstance(failure.code, str)
    assert isinstance(failure.message, str) and len(failure.message) <= 500
    assert failure.retry_after is None or (
        math.isfinite(failure.retry_after) and failure.retry_after >= 0
    )
    assert failure.should_retry in (None, True, False)


@given(headers=header_dicts, now=st.floats())
def test_header_parsers_never_raise(headers: dict[str, str], now: float):
    for parse in (parse_retry_after, parse_rate_limit_reset):
        wait = parse(headers, now)
        assert wait is None or (math.isfinite(wait) and wait >= 0)
