"""Tool calling through the official `openai` client: a model that answers "What is 12+30?" by calling `add`, reads
the result the client sends back as a `tool` message, and answers with it. The model generates the call itself (a
tiny one, trained to); the server renders tools and results in DeepSeek-V3's format and parses the calls out."""

import json

import openai
import pytest

from nanoseek.serve import create_app, running
from nanoseek.tokenizer import CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END

from .conftest import memorised

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
QUESTION = [{"role": "user", "content": "What is 12+30?"}]
ARGUMENTS = '{"a": 12, "b": 30}'
CALL = f"{CALLS_BEGIN}{CALL_BEGIN}function{CALL_SEP}add\n```json\n{ARGUMENTS}\n```{CALL_END}{CALLS_END}"
ANSWER = "12+30 is 42."


@pytest.fixture(scope="module")
def client(tok):
    called = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "add", "arguments": ARGUMENTS}}]},
        {"role": "tool", "content": "42"}]
    turns = [(tok.apply_chat_template(QUESTION, True, tools=TOOLS), CALL),
             (tok.apply_chat_template(called, True, tools=TOOLS), ANSWER)]
    model = memorised(tok, turns, max_position_embeddings=1024)  # a byte-level tokenizer of 300 ids: long prompts
    with running(create_app(model, tok, "tiny-tools")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def run_tool(call) -> str:
    assert call.type == "function" and call.function.name == "add"
    args = json.loads(call.function.arguments)
    return str(args["a"] + args["b"])


def test_a_tool_call_round_trip(client):
    first = client.chat.completions.create(model="tiny-tools", messages=QUESTION, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"a": 12, "b": 30}
    messages = QUESTION + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": run_tool(call)}]
    second = client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0)
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"


def test_streamed_tool_calls_and_tool_choice_none(client):
    chunks = list(client.chat.completions.create(model="tiny-tools", messages=QUESTION, tools=TOOLS, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "add"
    assert json.loads(calls[0].function.arguments) == {"a": 12, "b": 30}
    assert not "".join(d.content or "" for d in deltas)  # the call's text is not shown as content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(model="tiny-tools", messages=QUESTION, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=20)
    assert plain.choices[0].message.tool_calls is None  # the tools were not offered: no call parsed


def test_a_required_or_named_call_is_always_a_valid_call(tok):
    """tool_choice required / named constrains decoding to the call format: even a random model then calls a
    given tool with arguments that match its parameters, every time."""
    import torch

    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size,
                                                max_position_embeddings=1024)).eval()
    small = {"type": "integer", "minimum": 0, "maximum": 99}  # a random model's numbers must end somewhere
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": small, "b": small}, "required": ["a", "b"],
        "additionalProperties": False}}},
             {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
        "additionalProperties": False}}}]
    with running(create_app(model, tok, "random")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        required = client.chat.completions.create(model="random", messages=QUESTION, tools=tools, n=20, seed=1,
                                                  tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                                  temperature=1.0).choices
        named = client.chat.completions.create(model="random", messages=QUESTION, tools=tools, n=10, seed=2,
                                               tool_choice={"type": "function", "function": {"name": "now"}},
                                               max_tokens=300, temperature=1.0).choices
    for choice in required + named:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "add":
                assert isinstance(args["a"], int) and isinstance(args["b"], int)
            else:
                assert call.function.name == "now" and args in ({"zone": "utc"}, {"zone": "local"})
    assert all(len(c.message.tool_calls) == 1 for c in required + named)
    assert all(c.message.tool_calls[0].function.name == "now" for c in named)
    assert {c.message.tool_calls[0].function.name for c in required} == {"add", "now"}  # sampled, either
