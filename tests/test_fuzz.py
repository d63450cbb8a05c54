"""Schemathesis, driven by the server's own OpenAPI schema: a few hundred generated requests (valid and not) against
a server with an API key on 127.0.0.1. Every response must be a status the schema documents, of the documented
content type and shape, never a 5xx; and the server must still answer afterwards."""

import httpx
import openai
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from nanoseek import ModelConfig, Transformer
from nanoseek.serve import create_app, running

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
KEY = "fuzz-key"


def test_generated_requests_get_documented_answers_and_never_a_server_error(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64)).eval()
    app = create_app(model, tok, "tiny-test", api_key=KEY, max_batch=8, max_queue=64)
    calls = []
    with running(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                calls.append(operation.label)
                case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=60)
            fuzz()  # a failed check fails the test with Schemathesis' report (and a curl line to reproduce it)
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).completions.create(
            model="tiny-test", prompt="1+1=", max_tokens=2)
        health = httpx.get(f"{url}/health").json()
    assert len(calls) >= 200 and len(set(calls)) == 6, (len(calls), sorted(set(calls)))
    assert reply.choices[0].finish_reason in ("length", "stop") and health["status"] == "ok"
