"""The OpenAI chat completions request as pydantic models (what the ingress validates), and the rows the ingress
and the backbone deployment exchange (RowRequest -> RowResult, or StreamEvents)."""

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from pipelines.serve.errors import ErrorBody


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # the openai client may send it; ignored (no obfuscation here)


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown fields are refused (400): a mistyped `safety_module` must not be ignored.

    JSON types are strict, as OpenAI's: `"stream": "yes"`, `"max_tokens": true` or `"8"` are 400s, not coerced.
    `user`, `store` and `metadata` (sent by common clients) are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    safety_modules: list[StrictStr] | None = None
    safety_profile: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)  # a JSON integer is a number too (StrictFloat takes it)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    user: StrictStr | None = None  # ignored
    store: StrictBool | None = None  # ignored: nothing is stored for later retrieval
    metadata: dict[StrictStr, StrictStr] | None = None  # ignored
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logprobs: StrictBool | None = None
    ignore_eos: StrictBool = Field(False, description="Decode exactly max_tokens (vLLM's extension; for benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class RowRequest(BaseModel):
    """One chat as the backbone sees it: messages plus the effective module set (already merged by the ingress)."""

    messages: list[dict[str, str]]
    active: list[str]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool = False


class RowResult(BaseModel):
    """One chat's answer, or its error."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    control_tokens: int = 0
    active_modules: list[str] = Field(default_factory=list)
    inserted_modules: list[str] = Field(default_factory=list)
    """The active modules the request got: all of them, except gated ones whose gate did not fire on it."""
    module_versions: dict[str, str] = Field(default_factory=dict)
    error: ErrorBody | None = None


class StreamEvent(BaseModel):
    """What the backbone's `stream` yields: `start` (validated; modules + prompt size), `delta`s, then `end` (the
    RowResult, possibly an error). A request refused before `start` yields only `end` with its error."""

    kind: Literal["start", "delta", "end"]
    text: str = ""
    result: RowResult | None = None
