"""The OpenAI-compatible server, in-process on a free port, through the official `openai` client and raw HTTP."""

import functools
import json
import os
import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.serve import create_app, running
from nanoseek.serve.schemas import sse
from nanoseek.tokenizer import ReasoningSplitter
from nanoseek.tokenizer import split_reasoning

NAME = "tiny-test"
CHAT = [{"role": "user", "content": "What is 12+30?"}]


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()  # context 512


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, NAME, max_batch=8, max_queue=64)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def guarded(model, tok):
    """A server with a key and room for one request only."""
    with running(create_app(model, tok, NAME, api_key="secret", max_batch=1, max_queue=1)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    """/health once no request is waiting or running."""
    deadline = time.monotonic() + timeout
    while (h := health(url))["requests"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return h


# ---- log-probs ---------------------------------------------------------------------------------------------------
def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log softmax of the model's logits before each of ids[1:] (len - 1, V), by one full forward."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)


def test_completion_log_probs_with_echo_are_the_models_own(client, model):
    """What lm-eval's local-completions sends for a log-likelihood: token ids, echo, logprobs, greedy."""
    prompt = [0, 5, 17, 42, 9, 33]
    r = client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    greedy = list(prompt)
    for _ in range(4):
        greedy.append(int(model_logprobs(model, greedy + [0])[-1].argmax()))
    expected = model_logprobs(model, greedy)
    for at in range(1, len(greedy)):
        assert lp.token_logprobs[at] == pytest.approx(float(expected[at - 1, greedy[at]]), abs=1e-5)
        top = lp.top_logprobs[at]
        assert max(top.values()) == pytest.approx(float(expected[at - 1].max()), abs=1e-5)  # lm-eval's is_greedy
        assert 1 <= len(top) <= 3  # the two most likely and the token itself, by text (byte pieces decode alike)
    assert lp.text_offset[0] == 0 and r.choices[0].text.startswith("".join(lp.tokens[:len(prompt)]))


def test_chat_log_probs_plain_and_streamed(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob
               and c.bytes == list(c.token.encode()) for c in content)
    streamed = [c.logprobs.content for chunk in client.chat.completions.create(**kw, stream=True)
                for c in chunk.choices if c.logprobs is not None]
    assert [(c.token, c.logprob) for part in streamed for c in part] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_streamed_completion_log_probs_and_echo_add_up(client):
    kw = dict(model=NAME, prompt="What is 1+2?", echo=True, logprobs=1, max_tokens=6, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for chunk in client.completions.create(**kw, stream=True) for c in chunk.choices]
    assert "".join(c.text for c in chunks) == whole.text
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(whole.logprobs, key)


# ---- structured output -------------------------------------------------------------------------------------------
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "steps": {"type": "array", "maxItems": 3,
                                                     "items": {"type": "string", "pattern": "^[0-9+=]{1,8}$"}},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "ok"], "additionalProperties": False}


def valid_answer(text: str) -> bool:
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(d, dict) and set(d) <= {"answer", "steps", "ok"} and {"answer", "ok"} <= set(d)
            and isinstance(d["answer"], int) and 0 <= d["answer"] <= 999 and isinstance(d["ok"], bool)
            and all(isinstance(x, str) and re.fullmatch(r"[0-9+=]{1,8}", x) for x in d.get("steps", []))
            and len(d.get("steps", [])) <= 3)


@pytest.mark.parametrize("speculative", [False, True])
def test_json_schema_output_always_parses_and_validates(tok, speculative):
    """200 sampled replies of a random model under a JSON schema (the MTP module drafting, or not): all valid."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1)).eval()
    with running(create_app(model, tok, NAME, max_batch=16, max_queue=200, speculative=speculative)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda seed: client.chat.completions.create(
                model=NAME, messages=CHAT, max_tokens=120, temperature=1.0, seed=seed * 50, n=50,
                response_format=fmt), range(4)))
        texts = [c.message.content for r in replies for c in r.choices]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=120, seed=7, response_format=fmt, stream=True) if c.choices)
        objects = client.completions.create(model=NAME, prompt="1+1=", max_tokens=200, seed=3, n=8,  # vLLM's extension
                                            extra_body={"response_format": {"type": "json_object"}}).choices
    assert len(texts) == 200 and all(map(valid_answer, texts)), [t for t in texts if not valid_answer(t)][:3]
    assert len(set(texts)) > 20  # sampled, not one fixed reply
    assert valid_answer(streamed)
    finished = [c.text for c in objects if c.finish_reason == "stop"]  # any object: it may run past max_tokens
    assert finished and all(isinstance(json.loads(t), dict) for t in finished)


def test_unusable_response_formats_are_named(client):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=CHAT, response_format=fmt)
        assert e.value.body["param"].startswith("response_format"), e.value.body


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_latencies(model, tok):
    from prometheus_client.parser import text_string_to_metric_families

    with running(create_app(model, tok, NAME, max_batch=4)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=5, n=3, temperature=1, seed=2)
        text = client.completions.create(model=NAME, prompt="1+1=", max_tokens=4, extra_body={"ignore_eos": True})
        wait_idle(url)
        r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    generated = chat.usage.completion_tokens + text.usage.completion_tokens
    assert value("nanoseek:generation_tokens_total") == generated
    assert value("nanoseek:prompt_tokens_total") == chat.usage.prompt_tokens * 3 + text.usage.prompt_tokens
    assert value("nanoseek:time_to_first_token_seconds_count") == 4  # one per choice
    assert value("nanoseek:inter_token_latency_seconds_count") == generated - 4
    finished = sum(value("nanoseek:requests_total", endpoint="chat", finish_reason=c.finish_reason)
                   for c in {c.finish_reason: c for c in chat.choices}.values())
    assert finished == 3 and value("nanoseek:requests_total", endpoint="completions", finish_reason="length") == 1
    assert value("nanoseek:prefix_cache_hit_tokens_total") == 2 * chat.usage.prompt_tokens  # n=3: prefilled once
    assert value("nanoseek:num_requests_running") == 0 and value("nanoseek:batch_occupancy") == 0


# ---- reasoning ---------------------------------------------------------------------------------------------------
SYNTHETIC = ["  <think> add the units\n</think>\n\n<answer>42</answer> ", "no tags at all  ",
             "<think>unclosed, all reasoning", "before <think>x</think> after <think>not reasoning</think>",
             "a</think>b<think>c", "<thi", "<think></think>", "x <", " \n ", "<think> </think> ",
             "<<think>>r<</think>>c"]


@pytest.mark.parametrize("text", SYNTHETIC)
def test_streamed_reasoning_split_equals_the_whole_text_split(text):
    rng = random.Random(0)
    want_reasoning, want_content = split_reasoning(text)
    for trial in range(30):  # char by char, then random cuts (tags split across pieces)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if trial else \
            range(1, len(text))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        splitter, reasoning, content = ReasoningSplitter(), "", ""
        for i, piece in enumerate(pieces):
            r, c = splitter.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + c
        assert (reasoning, content) == (want_reasoning or "", want_content), pieces


def test_a_possible_tag_start_is_held_back():
    splitter = ReasoningSplitter()
    assert splitter.feed("ok <thi") == ("", "ok")
    assert splitter.feed("nk>why</th") == ("why", "")
    assert splitter.feed("ink> done") == ("", "  done")  # "ok" + " " held + " done", as split_reasoning keeps them


# ---- the API, end to end -----------------------------------------------------------------------------------------
def test_chat_splits_reasoning_and_counts_tokens(client, tok):
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    raw = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == NAME and reply.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (len(prompt), 12, len(prompt) + 12)
    assert "<think>" not in raw and choice.message.content == raw.strip()
    assert getattr(choice.message, "reasoning_content", None) is None


@pytest.mark.parametrize("kwargs", [{"thinking": True}, {"thinking": False}, {"enable_thinking": True}])
def test_thinking_switch_opens_the_reply_and_the_split_follows(client, tok, kwargs):
    thinking = next(iter(kwargs.values()))
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, thinking=thinking)
    assert tok.decode(prompt).endswith("<think>" if thinking else "<think> </think>")
    settings = dict(model=NAME, messages=CHAT, max_tokens=12, temperature=0,
                    extra_body={"ignore_eos": True, "chat_template_kwargs": kwargs})
    reply = client.chat.completions.create(**settings)
    raw = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    message = reply.choices[0].message
    assert reply.usage.prompt_tokens == len(prompt)
    if thinking:  # the whole reply is reasoning until the model closes the think
        assert "</think>" not in raw and message.reasoning_content == raw.strip() and message.content == ""
    else:
        assert message.reasoning_content == "" and message.content == raw.strip()
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**settings, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content


def test_streaming_adds_up_to_the_non_streaming_reply(client):
    settings = dict(model=NAME, messages=CHAT, max_tokens=16, temperature=0.9, seed=3)
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
        (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_a_streamed_event_is_one_line_for_every_reader_of_lines():
    """Text with characters that `str.splitlines` (httpx's `iter_lines`) breaks lines at arrives whole."""
    text = "a\u2028b\x85c\u2029d\r\ne\x1cf\x0bg"
    lines = [line for line in httpx.Response(200, content=sse({"content": text}).encode()).iter_lines() if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: ")) == {"content": text}


def test_completions_seeds_and_choices(client, tok):
    def complete(prompt, **settings):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0,
                                         extra_body={"ignore_eos": True}, **settings)

    one, again, other = (complete("hello world", seed=seed) for seed in (5, 5, 6))
    assert one.object == "text_completion" and one.choices[0].text == again.choices[0].text != other.choices[0].text
    assert one.usage.prompt_tokens == len(tok.encode("hello world", add_bos=True))
    both = complete(["hello world", "Sort: 3, 1"], seed=5, n=2)  # prompt p, choice i: index 2p + i, seed 5 + i
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [both.choices[0].text, both.choices[1].text] == [one.choices[0].text, other.choices[0].text]
    assert both.usage.prompt_tokens == one.usage.prompt_tokens + len(tok.encode("Sort: 3, 1", add_bos=True))
    assert both.usage.completion_tokens == 40


def test_stop_strings_streamed_and_not(client, server):
    settings = dict(model=NAME, prompt="Sort: 3, 1, 2", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**settings).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = client.completions.create(**settings, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[:free.find(stop)]
    body = {"model": NAME, "prompt": "Sort: 3, 1, 2", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stop": [stop, "zz-never"], "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_health_page_and_schema(client, server):
    assert [m.id for m in client.models.list().data] == [NAME] and client.models.retrieve(NAME).id == NAME
    h = health(server)
    assert h["status"] == "ok" and h["model"] == NAME and h["context"] == 512
    assert {"/v1/chat/completions", "/v1/completions"} <= set(httpx.get(f"{server}/openapi.json").json()["paths"])
    page = httpx.get(server)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "reasoning_content" in page.text


LONG = list(range(10, 60)) * 11  # 550 token ids: more than the context holds
BAD = [  # (path, body, status, param)
    ("/v1/chat/completions", "{not json", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "model"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "stop": ["a", 1]}, 400, "stop.1"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404, "model"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "n": 65}, 400, "n"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "tools.0.function"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/completions", {"model": NAME, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 100000]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ""}, 400, "stop"),
    ("/v1/embeddings", {"model": NAME, "input": "hi"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[str(b)[:40] for _, b, _, _ in BAD])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}{path}", content=content, headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)


def test_api_key_and_full_queue(guarded):
    assert httpx.post(f"{guarded}/v1/completions", json={"model": NAME, "prompt": "hi"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()
    assert health(guarded)["status"] == "ok"  # /health needs no key
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="secret", max_retries=0)
    long = client.completions.create(model=NAME, prompt="hello", max_tokens=480, stream=True,
                                     extra_body={"ignore_eos": True})
    next(iter(long))  # admitted: the one place is taken
    with pytest.raises(openai.RateLimitError, match="busy"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=2)
    long.close()
    assert wait_idle(guarded)["requests"] == 0
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_many_concurrent_streams_batch_and_all_finish(client, server):
    prompts = ["hello world", "Sort: 3, 1, 2"]
    solo = [client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    def stream(i: int) -> tuple[str, str]:
        chunks = client.completions.create(model=NAME, prompt=prompts[i % 2], max_tokens=12, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks]
        return "".join(t for t, _ in parts), parts[-1][1]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))  # a 5xx would raise openai.InternalServerError here
    assert results == [(solo[i % 2], "length") for i in range(32)]
    assert wait_idle(server)["requests"] == 0


def test_a_client_that_goes_away_is_cancelled(server):
    before = health(server)["cancelled"]
    body = {"model": NAME, "prompt": "hello", "max_tokens": 500, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.2)
    h = wait_idle(server)
    assert h["requests"] == h["running"] == h["waiting"] == 0 and h["cancelled"] == before + 2


def test_speculative_server_gives_the_same_greedy_text(model, tok, client):
    settings = dict(model=NAME, prompt="hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    with running(create_app(model, tok, NAME, max_batch=2, speculative=True)) as url:
        spec = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(**settings)
    assert spec.choices[0].text == client.completions.create(**settings).choices[0].text


def test_a_speculative_server_needs_an_mtp_module(tok):
    """Refused before the server starts, with the reason, not by the engine's process after it."""
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
    with pytest.raises(NanoseekError, match="MTP module"):
        create_app(model, tok, NAME, speculative=True)


class FailsOnce(Engine):
    """An engine whose first step in its process raises, as running out of memory would."""
    failed = False

    def step(self):
        if not FailsOnce.failed:
            FailsOnce.failed = True
            raise RuntimeError("out of memory")
        return super().step()


def test_an_engine_failure_is_a_500_and_serving_goes_on(model, tok):
    app = create_app(model, tok, NAME, max_batch=2)
    app.state.worker.make_engine = functools.partial(FailsOnce, model, tok, 2)  # made in the engine's process
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3}
    with running(app) as url:
        failed = httpx.post(f"{url}/v1/completions", json=body)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        assert health(url)["requests"] == 0


def test_a_dead_engine_process_fails_its_requests_and_a_new_one_serves(model, tok):
    app = create_app(model, tok, NAME, max_batch=2)
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3}
    with running(app) as url:
        worker = app.state.worker
        first = worker.process
        os.kill(first.pid, signal.SIGSTOP)  # the request below waits in its pipe
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
            while health(url)["requests"] == 0:
                time.sleep(0.01)
            os.kill(first.pid, signal.SIGKILL)
            failed = pending.result()
        assert failed.status_code == 500 and "died" in failed.json()["error"]["message"]
        deadline = time.monotonic() + 60
        while worker.process is first and time.monotonic() < deadline:  # a new process is starting
            time.sleep(0.05)
        assert worker.process is not first and worker.process.is_alive()
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        assert health(url)["requests"] == 0


def test_cli_serve_with_a_bad_model_dir(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err


class WarmsUp(Engine):
    """An engine whose warm-up (compiling its steps; stood in for here) takes a while."""

    def warmup(self, params=None) -> float:
        time.sleep(0.5)
        return 12.5


def test_a_compiling_server_warms_up_before_it_takes_requests(model, tok):
    app = create_app(model, tok, NAME, max_batch=2, compile=True)
    worker = app.state.worker
    assert worker.warm_up and worker.make_engine.args[-1]  # the engine's compile setting
    worker.make_engine = functools.partial(WarmsUp, model, tok, 2)
    with running(app) as url:
        assert worker.warmup_seconds == 12.5  # reported by the engine's process when it was ready
        assert health(url)["requests"] == 0
