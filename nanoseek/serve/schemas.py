"""The API's wire format: request models (pydantic, strict), OpenAI-shaped errors, and the pieces of responses."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Completion
from ..grammar import json_grammar, tool_call_grammar
from ..sampling import MAX_LOGPROBS, SamplingError
from ..tokenizer import parse_tool_calls, split_reasoning


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": self.TYPES.get(status, "invalid_request_error"),
                               "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "a malformed request, or settings the model cannot honour (the field is named in `param`)"),
    (401, "a missing or wrong API key (when the server has one)"), (404, "no such model"),
    (429, "the server's queue is full; retry later"), (500, "the engine failed; see the server log"))}


# ---- requests --------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # "1" is not a number; unknown fields are ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart] | None = None  # None: an assistant message that only calls tools
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str | None) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return message


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^\w+$")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchema(_Strict):
    name: str
    schema_: dict | None = Field(None, alias="schema", description="a JSON schema the output must match")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class GenerationRequest(_Strict):  # the fields both endpoints share
    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: what the context leaves after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, ge=0, le=100, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=-2**63, lt=2**63, description="choice i samples with seed + i")
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, description="choices per prompt")
    ignore_eos: bool = Field(False, description="extension: go on past the end-of-sentence token")
    response_format: ResponseFormat | None = Field(None, description="json_object: any JSON object; json_schema: "
                                                   "JSON matching its schema (constrained decoding)")

    def grammar(self) -> str | None:
        """The grammar the output must follow (grammar.py), or None for free text."""
        f = self.response_format
        if f is None or f.type == "text":
            return None
        if f.type == "json_schema" and (f.json_schema is None or f.json_schema.schema_ is None):
            raise APIError(400, "response_format: json_schema needs a `json_schema` with a `schema`", "response_format")
        try:
            return json_grammar(f.json_schema.schema_ if f.type == "json_schema" else None)
        except SamplingError as e:
            raise APIError(400, f"response_format: {e}", "response_format") from None

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        """Alternatives to report with each generated token and each prompt token (None: no log-probs)."""
        return None, None


class ChatTemplateKwargs(_Strict):
    thinking: bool | None = Field(None, description="true: the reply opens with <think>; false: with an empty think "
                                  "(an answer without reasoning); unset: the model's choice (DeepSeek-V3.1's switch)")
    enable_thinking: bool | None = Field(None, description="the same switch under Qwen3's name")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(False, description="the model's log-prob of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="with logprobs: this many most likely tokens at each place")
    tools: list[Tool] | None = Field(None, description="functions the model may call (DeepSeek-V3's tool format)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools): the model decides; none: the tools are not offered; "
        "required, or a named function: the reply is a call (constrained decoding)")
    parallel_tool_calls: bool | None = Field(None, description="false: a required call is a single one")
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def thinking(self) -> bool | None:
        kwargs = self.chat_template_kwargs
        return None if kwargs is None else kwargs.thinking if kwargs.thinking is not None else kwargs.enable_thinking

    def offered_tools(self) -> list[dict] | None:
        """The tools to describe in the prompt (None: none, or tool_choice none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def grammar(self) -> str | None:
        """With tool_choice required or a named function: the grammar of a call; else as for any request."""
        named = isinstance(self.tool_choice, NamedToolChoice)
        if not (named or self.tool_choice == "required"):
            return super().grammar()
        if not self.tools or super().grammar() is not None:
            raise APIError(400, "tool_choice: a required call needs `tools` and no JSON response_format",
                           "tool_choice")
        try:
            return tool_call_grammar([t["function"] for t in self.offered_tools()],
                                     self.tool_choice.function.name if named else None,
                                     several=self.parallel_tool_calls is not False)
        except SamplingError as e:
            raise APIError(400, f"tool_choice: {e}", "tool_choice") from None

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s), or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="the log-prob of each token and of this many most likely alternatives")
    echo: bool | None = Field(False, description="the prompt before the completion (with logprobs: and its "
                              "tokens' log-probs)")

    def reported_logprobs(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None


# Known OpenAI fields this server cannot honour: a request that sets one to anything but these values gets a 400.
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "functions": (None, []), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


# ---- responses -------------------------------------------------------------------------------------------------
# Characters JSON leaves raw that line readers such as `str.splitlines` (httpx's `aiter_lines`) take for line ends.
# They can only stand inside JSON strings, where their escapes mean the same.
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def sse(obj: dict) -> str:
    """One server-sent event: `data: <compact JSON>` on one line (whichever line ends a client reads), a blank
    line."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, c: Completion, chat: bool, logprobs: dict | None = None, echo: str = "",
           tools: bool = False) -> dict:
    """A finished choice of a non-streaming response (chat: a message, the `<think>` part in reasoning_content
    (`echo`: what the prompt opened the reply with), with `tools` the calls in tool_calls; completions: the text,
    after the prompt's `echo`)."""
    finish_reason = c.finish_reason
    if chat:
        reasoning, content = split_reasoning(echo + c.text)
        calls = []
        if tools:
            content, calls = parse_tool_calls(content)
            content = content.strip()
        message = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning is not None:  # DeepSeek's name, and vLLM's newer one
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            message["tool_calls"] = [tool_call(name, arguments) for name, arguments in calls]
            finish_reason = "tool_calls"
        fields = {"message": message}
    else:
        fields = {"text": echo + c.text}
    return {"index": index, **fields, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    """A call in OpenAI's shape (with `index`: as a stream delta carries it)."""
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name,
                                                                                   "arguments": arguments}}
    return call if index is None else {"index": index, **call}
