"""Stage `serve`: composable safety modules behind an OpenAI-compatible endpoint on Ray Serve.

    mosaic serve --modules alcohol,betting --alias production     # registry: mosaic.<backbone>.<category>@production
    mosaic serve --bank runs/<name>/bank                           # a local bank directory (dev, tests)
    serve run cluster/serve_config.yaml                            # the same app from a Serve config

Two deployments (docs/serving.md):

* `MosaicBackbone` holds the frozen backbone and *every* module of its bundle in memory (a module is kilobytes).
  Requests carry their own active set. One engine thread decodes them with iteration-level batching
  (`mosaic_core.scheduler`): a request joins the running batch at the next decode step, rows with different active
  sets, lengths and sampling settings share every step, and a row leaves the step it finishes or its caller goes
  away; beyond `max_batch_size` rows requests wait in a bounded queue, beyond that they get 429 at once.
  Modules come from MLflow aliases (`resolve_bundle`) or a local bank dir; a new `user_config` (`serve deploy`, or
  `serve.run` again) re-resolves them and swaps the bank atomically through `reconfigure` — no restart, no dropped
  request. A failed swap keeps serving the old modules
  and reports the error in `/v1/modules`.
* `MosaicIngress` (FastAPI) speaks OpenAI chat completions (plain and SSE streaming), `/v1/models`, `/v1/modules`,
  `/v1/profiles`, `/healthz`; authenticates tenants (Bearer keys -> policy: mandatory modules, allowed profiles);
  maps every failure to one OpenAI error shape `{"error": {message, type, param, code}}`.

Effective modules of a request = tenant mandatory ∪ profile ∪ `safety_modules`; the response's `mosaic` block says
which were active, at which versions, and which were forced by the tenant.

Operations (docs/serving.md): SIGTERM/SIGINT drains the ingress (new requests 503, in-flight ones finish or get an
error within `--shutdown-timeout`), then stops Serve and Ray; the ingress records Ray Serve metrics (requests,
refusals, tokens, latency by module set, versions and tenant) and writes one audit JSON line per request.

Network rule (docs/architecture.md, platform notes): the proxy listens where `http_options` says (127.0.0.1 by default) and each
replica's internal gRPC server is bound to 127.0.0.1 by `pipelines._loopback` before it starts.
"""

import os

# No `from __future__ import annotations` here: Serve ships the ingress class to its replica by value, and FastAPI
# must resolve the route annotations there; string annotations would point at names cloudpickle did not carry.

# Before `import ray`: Ray's node IP becomes 127.0.0.1 and its core sockets bind loopback (docs/architecture.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

from fastapi import FastAPI, Header, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import (  # noqa: E402
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from ray import serve  # noqa: E402
from ray.serve import Application  # noqa: E402
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from mosaic_core.backbone import EMBEDDED  # noqa: E402
from mosaic_core.categories import CATEGORIES  # noqa: E402
from mosaic_core.config import DEFAULT_REFUSAL  # noqa: E402
from mosaic_core.errors import ConfigError, MosaicError, UnknownCategoryError  # noqa: E402
from mosaic_core.generation import find_stop, holdback  # noqa: E402

logger = logging.getLogger("ray.serve")  # Serve routes this logger into each replica's log file

APP_NAME = "mosaic"
BACKBONE_DEPLOYMENT, INGRESS_DEPLOYMENT = "MosaicBackbone", "MosaicIngress"
DEFAULT_PROFILES: dict[str, list[str]] = {"minor": list(CATEGORIES), "none": []}
ENV_MODULES, ENV_BANK_DIR, ENV_ALIAS = "MOSAIC_SERVE_MODULES", "MOSAIC_BANK_DIR", "MOSAIC_MODULE_ALIAS"
ENV_TENANTS_FILE, ENV_TENANTS = "MOSAIC_TENANTS_FILE", "MOSAIC_TENANTS"


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request failure with its HTTP status and OpenAI error fields; the ingress renders every one the same way."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after_s = message, param, code, retry_after_s

    def to_body(self) -> "ErrorBody":
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code, status=self.status,
                         retry_after_s=self.retry_after_s)  # fmt: skip


class InvalidRequest(ApiError):
    """400: the request is malformed or names something that does not exist."""


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status = 404


class Overloaded(ApiError):
    """429: the backbone's queue is full; the client should retry after `Retry-After` seconds."""

    status, type = 429, "rate_limit_error"


class Unavailable(ApiError):
    status, type = 503, "server_error"


class InternalError(ApiError):
    status, type = 500, "server_error"


class Cancelled(ApiError):
    """499 (nginx's "client closed request"): the caller went away; nobody reads it but the audit log."""

    status, type = 499, "server_error"


class ErrorBody(BaseModel):
    """An ApiError as data: crosses the handle from the backbone to the ingress (exceptions would arrive wrapped)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    status: int = 400
    retry_after_s: float | None = None

    def raise_(self) -> None:
        cls = {401: Unauthorized, 403: Forbidden, 404: NotFound, 429: Overloaded, 503: Unavailable}.get(
            self.status, InternalError if self.status >= 500 else InvalidRequest)  # fmt: skip
        err = cls(self.message, param=self.param, code=self.code, retry_after_s=self.retry_after_s)
        err.status, err.type = self.status, self.type
        raise err


def _from_mosaic_error(e: MosaicError) -> ApiError:
    if isinstance(e, UnknownCategoryError):
        return InvalidRequest(str(e), param="safety_modules", code="unknown_module")
    return InvalidRequest(str(e), code="invalid_request")


# --------------------------------------------------------------------------------------------- configuration


class ModuleSource(BaseModel):
    """Which modules the backbone deployment serves: its `user_config`, the only part that changes live.

    Edit it in cluster/serve_config.yaml (`deployments: [{name: MosaicBackbone, user_config: ...}]`) and `serve
    deploy` again: Serve calls `reconfigure` on the running replicas (changing `args` instead rebuilds the app)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: list[str] = Field(default_factory=list, description="Registry modules: `models:/<name>@<alias>`, "
                               "`models:/<name>/<version>`, or a bare category "
                               "(`mosaic.<backbone>.<category>@<alias>`).")  # fmt: skip
    alias: str = Field("production", description="Registry alias used for bare category names.")
    bank_dir: str | None = Field(None, description="A local bank directory (absolute) instead of the registry.")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI in "
                                     "the replica's environment).")  # fmt: skip
    poll_interval_s: float | None = Field(None, gt=0, description="Re-resolve aliases every N seconds and swap when a "
                                          "version moved (None: only on reconfigure).")  # fmt: skip
    revision: str | None = Field(None, description="Free-form; change it to force a re-resolve of unchanged aliases.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModuleSource":
        if self.modules and self.bank_dir:
            raise ValueError("give modules (registry) or bank_dir (local bank), not both")
        return self

    def uris(self, backbone_id: str) -> list[str]:
        """Every module as a `models:/` URI; bare categories named after the backbone actually loaded."""
        from mosaic_core.bundle import registered_name

        return [m if m.startswith("models:/") else f"models:/{registered_name(backbone_id, m)}@{self.alias}"
                for m in self.modules]  # fmt: skip


class TenantPolicy(BaseModel):
    """What one tenant may do. Keys are kept only as sha256 hex digests once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key_sha256: list[str] = Field(min_length=1, description="sha256 hex digests of the tenant's API keys.")
    mandatory_modules: list[str] = Field(default_factory=list, description="Always on; a request can add, never remove.")
    allowed_profiles: list[str] | None = Field(None, description="Profiles the tenant may request (None: any).")


class _TenantEntry(BaseModel):
    """One tenant as written in the tenants file (plain keys or their sha256)."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list)
    api_key_sha256: list[str] = Field(default_factory=list)
    mandatory_modules: list[str] = Field(default_factory=list)
    allowed_profiles: list[str] | None = None


class ServeArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of cluster/serve_config.yaml, or `mosaic serve` flags).

    Unset module/tenant fields fall back to the environment: MOSAIC_SERVE_MODULES (comma-separated), MOSAIC_BANK_DIR,
    MOSAIC_MODULE_ALIAS, MLFLOW_TRACKING_URI, MOSAIC_TENANTS_FILE, MOSAIC_TENANTS (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(EMBEDDED, description="HF id, local model dir, or the embedded default.")
    model_name: str | None = Field(None, description="Name served by /v1/models (default: the backbone's id).")
    modules: list[str] = Field(default_factory=list, description="Module URIs or bare category names (served as "
                               "`models:/mosaic.<backbone id>.<category>@<alias>`).")  # fmt: skip
    alias: str = Field("production", description="Registry alias used for bare category names.")
    bank_dir: str | None = Field(None, description="Serve a local bank directory instead of registry modules.")
    tracking_uri: str | None = Field(None, description="MLflow URI (default MLFLOW_TRACKING_URI, else runs/mlflow.db).")
    poll_interval_s: float | None = Field(None, gt=0, description="Re-resolve aliases periodically (seconds).")
    revision: str | None = Field(None, description="Bump to make `serve deploy` re-resolve unchanged aliases.")
    profiles: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_PROFILES.items()},
                                           description="Named module sets a request can pick with `safety_profile`.")  # fmt: skip
    tenants_file: str | None = Field(None, description="JSON/YAML tenants file (never in the repo).")
    threads: int = Field(2, ge=1, le=256, description="torch intra-op threads per backbone replica.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per backbone replica.")
    num_replicas: int = Field(1, ge=1, description="Backbone replicas (each holds the model and all modules).")
    max_batch_size: int = Field(16, ge=1, le=256, description="Rows decoding together in a backbone replica (the "
                                "running batch: requests join and leave it between decode steps).")  # fmt: skip
    max_queued_requests: int = Field(64, ge=0, description="Requests a replica keeps waiting for a free row; beyond "
                                     "that: 429 with Retry-After at once.")  # fmt: skip
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 429.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none (capped by context).")
    default_temperature: float = Field(0.0, ge=0, le=2, description="Temperature when a request gives none: greedy, "
                                       "because modules were trained against the base model's greedy answers.")  # fmt: skip
    max_context_tokens: int | None = Field(None, ge=8, description="Prompt + control + new tokens budget (default: the "
                                           "model's max_position_embeddings).")  # fmt: skip
    health_check_period_s: float = Field(5.0, gt=0, description="How often Serve checks a backbone replica.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="How long a replica Serve stops (shutdown, redeploy) "
                                      "may finish its in-flight requests (graceful_shutdown_timeout_s).")  # fmt: skip
    audit_log: str | None = Field("stdout", description="Audit trail, one JSON line per request: `stdout` (the "
                                  "ingress replica's log), a directory (one `audit-<pid>.jsonl` per ingress replica "
                                  "process, rotated), or `off`.")  # fmt: skip
    audit_prompts: bool = Field(False, description="Also write messages and answers into the audit log.")
    audit_max_bytes: int = Field(64 << 20, ge=1024, description="Rotate an audit file at this size.")
    audit_backup_count: int = Field(10, ge=0, description="Rotated audit files kept per replica process.")
    refusal_template: str = Field(DEFAULT_REFUSAL, description="An answer starting with it counts as a refusal "
                                  "(metrics, audit).")  # fmt: skip

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = [k for k in v if not k or not k.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"profile names must be alphanumeric (- and _ allowed): {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        problems = []
        if self.modules and self.bank_dir:
            problems.append("give modules (registry) or bank_dir (local bank), not both")
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append(f"default_max_tokens {self.default_max_tokens} > max_tokens_limit {self.max_tokens_limit}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeArgs":
        """Parse `args` with the environment fallbacks; every problem reported in one ConfigError."""
        data = dict(args or {})
        if not data.get("modules") and not data.get("bank_dir"):
            if os.environ.get(ENV_MODULES):
                data["modules"] = [m.strip() for m in os.environ[ENV_MODULES].split(",") if m.strip()]
            elif os.environ.get(ENV_BANK_DIR):
                data["bank_dir"] = os.environ[ENV_BANK_DIR]
        if "alias" not in data and os.environ.get(ENV_ALIAS):
            data["alias"] = os.environ[ENV_ALIAS]
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError([_describe_validation(err) for err in e.errors()], "serve args") from None

    def served_name(self) -> str:
        """What /v1/models lists and `model` must name: the backbone's id, as load_backbone computes it."""
        if self.model_name:
            return self.model_name
        p = Path(self.backbone).expanduser()
        return p.name if self.backbone != EMBEDDED and p.is_dir() else self.backbone

    def module_source(self) -> ModuleSource:
        """The backbone's user_config, with paths and the tracking URI made absolute here at the driver (docs/architecture.md)."""
        from pipelines._registry import resolve_tracking_uri

        return ModuleSource(
            modules=list(self.modules), alias=self.alias,
            bank_dir=str(Path(self.bank_dir).expanduser().resolve()) if self.bank_dir else None,
            tracking_uri=resolve_tracking_uri(self.tracking_uri) if self.modules else self.tracking_uri,
            poll_interval_s=self.poll_interval_s, revision=self.revision,
        )  # fmt: skip


def _describe_validation(err: Any) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_tenants(path: str | None, profiles: dict[str, list[str]]) -> list[TenantPolicy]:
    """Tenants from `path` (JSON or YAML), else $MOSAIC_TENANTS_FILE, else $MOSAIC_TENANTS (JSON); [] when none.

    Format: `{"tenants": {"<name>": {"api_keys": [...] | "api_key_sha256": [...], "mandatory_modules": [...],
    "allowed_profiles": [...]}}}`. Plain keys are hashed at once: only digests travel to the replicas."""
    path = path or os.environ.get(ENV_TENANTS_FILE)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError([f"tenants file {p} does not exist"], "tenants")
        import yaml  # JSON is YAML: one parser for both

        raw = yaml.safe_load(p.read_text())
        where = str(p)
    elif os.environ.get(ENV_TENANTS):
        try:
            raw = json.loads(os.environ[ENV_TENANTS])
        except json.JSONDecodeError as e:
            raise ConfigError([f"${ENV_TENANTS} is not valid JSON: {e}"], "tenants") from None
        where = f"${ENV_TENANTS}"
    else:
        return []
    if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), dict) or not raw["tenants"]:
        raise ConfigError([f"{where}: expected {{'tenants': {{<name>: {{api_keys: [...], ...}}}}}}"], "tenants")
    problems, tenants, seen = [], [], {}
    for name, spec in raw["tenants"].items():
        try:
            entry = _TenantEntry.model_validate(spec)
        except ValidationError as e:
            problems += [f"{where}: tenant {name!r}: {_describe_validation(x)}" for x in e.errors()]
            continue
        digests = [_sha256(k) for k in entry.api_keys] + [h.lower() for h in entry.api_key_sha256]
        if not digests:
            problems.append(f"{where}: tenant {name!r} has no api_keys / api_key_sha256")
        for d in digests:
            if d in seen:
                problems.append(f"{where}: tenants {seen[d]!r} and {name!r} share an API key")
            seen[d] = name
        unknown = sorted(set(entry.allowed_profiles or []) - set(profiles))
        if unknown:
            problems.append(f"{where}: tenant {name!r} allows unknown profile(s) {unknown}; known: {sorted(profiles)}")
        if digests:
            tenants.append(TenantPolicy(name=str(name), key_sha256=digests, mandatory_modules=entry.mandatory_modules,
                                        allowed_profiles=entry.allowed_profiles))  # fmt: skip
    if problems:
        raise ConfigError(problems, "tenants")
    return tenants


class BackboneSettings(BaseModel):
    """Init args of the backbone deployment (changing them restarts its replicas)."""

    backbone: str
    threads: int
    max_batch_size: int
    max_queued_requests: int
    retry_after_s: float
    default_max_tokens: int
    max_context_tokens: int | None


class IngressSettings(BaseModel):
    """Init args of the ingress deployment."""

    model_name: str
    profiles: dict[str, list[str]]
    tenants: list[TenantPolicy]
    max_tokens_limit: int
    default_temperature: float
    retry_after_s: float
    audit_log: str | None = "stdout"
    audit_prompts: bool = False
    audit_max_bytes: int = 64 << 20
    audit_backup_count: int = 10
    refusal_template: str = DEFAULT_REFUSAL


# --------------------------------------------------------------------------------------------- OpenAI schema


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
    module_versions: dict[str, str] = Field(default_factory=dict)
    error: ErrorBody | None = None


class StreamEvent(BaseModel):
    """What the backbone's `stream` yields: `start` (validated; modules + prompt size), `delta`s, then `end` (the
    RowResult, possibly an error). A request refused before `start` yields only `end` with its error."""

    kind: Literal["start", "delta", "end"]
    text: str = ""
    result: RowResult | None = None


# --------------------------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class ModuleState:
    """An immutable snapshot of what is served: swapped by one reference assignment, so a batch that took it keeps a
    consistent bank while `reconfigure` installs the next one."""

    bank: Any  # ControlTokenBank | None
    modules: tuple[dict[str, Any], ...]
    source: ModuleSource
    loaded_at: float = field(default_factory=time.time)

    @property
    def versions(self) -> dict[str, str]:
        return {m["category"]: m["version"] for m in self.modules}

    def canonical(self, active: Sequence[str]) -> tuple[str, ...]:
        if self.bank is None:
            if active:
                raise UnknownCategoryError(sorted(set(active)), [])
            return ()
        return self.bank.canonical(active)


ModuleLoader = Callable[[ModuleSource, Any], ModuleState]
"""(source, backbone fingerprint) -> ModuleState. Injectable so a test can hand the deployment a fake."""


def load_modules(source: ModuleSource, expected: Any) -> ModuleState:
    """Resolve and check the modules of `source` against the backbone fingerprint `expected` (all or nothing)."""
    from mosaic_core.artifact import load_bank, read_manifest, read_meta

    if source.bank_dir:
        bank_dir = Path(source.bank_dir)
        bank = load_bank(bank_dir, expected)
        manifest = read_manifest(bank_dir)
        modules = []
        for c in bank.categories:
            meta = read_meta(bank_dir / manifest["modules"][c]["path"])
            # A local bank has no registry version: the tensor's hash names exactly what is served.
            modules.append({"category": c, "version": f"local-{meta.sha256[:12]}", "name": c, "uri": str(bank_dir / c),
                            "requested": str(bank_dir), "aliases": [], "sha256": meta.sha256, "m": bank.m,
                            "placement": bank.placement, "training_run_id": meta.training_run_id or "none"})  # fmt: skip
        return ModuleState(bank, tuple(modules), source)
    if source.modules:
        from mosaic_core.bundle import parse_module_uri
        from pipelines._registry import resolve_bundle

        bank, infos = resolve_bundle(source.uris(expected.model_id), expected, tracking_uri=source.tracking_uri)
        modules = []
        for info in infos:
            alias = parse_module_uri(info["requested"]).alias
            modules.append({**info, "aliases": [alias] if alias else [], "m": bank.m, "placement": bank.placement})
        return ModuleState(bank, tuple(modules), source)
    return ModuleState(None, (), source)


@dataclass
class _Job:
    """A request inside the backbone replica, from `generate`/`stream` to its result. `done(result)` is called once,
    from the engine thread; `emit(event)` streams events (already thread-safe)."""

    row: RowRequest
    done: Callable[["RowResult"], None]
    emit: Callable[[StreamEvent], None] | None = None
    cancelled: bool = False


@dataclass
class _Prepared:
    """A validated, encoded row: its canonical active set, token budget and the module snapshot it was admitted
    under (a swap applies to rows admitted after it)."""

    job: _Job
    state: "ModuleState"
    segments: Any  # mosaic_core.compose.Segments
    active: tuple[str, ...]
    max_tokens: int
    prompt_tokens: int
    control_tokens: int
    emitted: int = 0


# --------------------------------------------------------------------------------------------- backbone deployment


@serve.deployment(name=BACKBONE_DEPLOYMENT)
class MosaicBackbone:
    """The frozen backbone + all modules of its bundle; batches rows with different active sets into one forward."""

    def __init__(self, settings: dict[str, Any], loader: ModuleLoader | None = None) -> None:
        from pipelines import _loopback

        # The replica's internal gRPC server starts after this constructor returns: bind it to 127.0.0.1.
        _loopback.install()
        import torch

        from mosaic_core.backbone import load_backbone

        self.settings = BackboneSettings.model_validate(settings)
        torch.set_num_threads(self.settings.threads)
        self.bb = load_backbone(self.settings.backbone)
        self.embed = self.bb.model.get_input_embeddings()
        from mosaic_core.compose import PrefixCache

        # Deep modules are keys/values appended after the request's own, which come from this cache (bounded; a
        # lock because decoding runs on worker threads). Input-token banks do not use it.
        self.prefix_cache, self._prefix_lock = PrefixCache(self.bb.model, max_bytes=256 << 20), threading.Lock()
        cfg = self.bb.model.config
        self.context = self.settings.max_context_tokens or int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        eos = {self.bb.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.bb.model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos = sorted(t for t in eos if t is not None)
        self.loader = loader or load_modules
        self.state: ModuleState | None = None
        self.last_error: str | None = None
        self._swap_lock = asyncio.Lock()
        self._poll_task: asyncio.Task | None = None
        # Observability (health()): decode steps ("batches"), and proof that rows with different active sets share them.
        self.stats = {"batches": 0, "rows": 0, "mixed_batches": 0, "max_batch_rows": 0, "max_batch_active_sets": 0,
                      "joins": 0, "cancelled": 0, "rejected": 0, "queued": 0, "running": 0}  # fmt: skip
        # The engine: one thread owns the running batch (mosaic_core.scheduler); requests wait in a bounded queue.
        self._queue: collections.deque[_Job] = collections.deque()
        self._held, self._held_lock = 0, threading.Lock()  # requests accepted and not answered yet (rows + queue)
        self._wake = threading.Event()
        self._engine = threading.Thread(target=self._engine_loop, name="mosaic-engine", daemon=True)
        self._engine.start()
        logger.info("backbone %s (fingerprint %s) loaded; context %d tokens", self.bb.fingerprint.model_id,
                    self.bb.fingerprint.digest, self.context)  # fmt: skip

    # ----------------------------------------------------------------------------------------- modules, live

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Resolve the modules of a new `user_config` and swap them in atomically.

        The first call (replica start) raises on a bad bundle, so a broken deploy fails loudly. Later calls keep
        serving the current modules when the new ones cannot be loaded — dropping every request because an alias
        pointed at an incompatible version is worse — and report the error in /v1/modules and the log."""
        source = ModuleSource.model_validate(user_config or {})
        if not await self._swap(source, initial=self.state is None):
            return  # still serving (and polling) the previous source
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        if source.poll_interval_s and source.modules:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(source))

    async def _swap(self, source: ModuleSource, *, initial: bool) -> bool:
        async with self._swap_lock:
            try:
                state = await asyncio.to_thread(self.loader, source, self.bb.fingerprint)
            except Exception as e:
                if initial:
                    raise
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error("module swap failed, still serving %s: %s", self.state.versions if self.state else {}, e)
                return False
            before = self.state.versions if self.state else {}
            self.state, self.last_error = state, None  # one assignment: batches in flight keep their snapshot
            logger.info("serving modules %s (was %s)", state.versions, before)
            return True

    async def _poll(self, source: ModuleSource) -> None:
        """Follow moving aliases: re-resolve every poll interval, swap only when a version changed."""
        while True:
            await asyncio.sleep(source.poll_interval_s or 60)
            if self.state is None or self.state.source != source:
                return
            try:
                fresh = await asyncio.to_thread(self.loader, source, self.bb.fingerprint)
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                continue
            if fresh.versions != self.state.versions:
                async with self._swap_lock:
                    if self.state.source == source:
                        logger.info("alias moved: serving %s (was %s)", fresh.versions, self.state.versions)
                        self.state, self.last_error = fresh, None

    async def modules(self) -> dict[str, Any]:
        """What /v1/modules shows."""
        st = self.state
        return {"backbone": self.bb.fingerprint.model_id, "fingerprint": self.bb.fingerprint.digest,
                "placement": st.bank.placement if st and st.bank is not None else None,
                "source": "bank_dir" if st and st.source.bank_dir else "registry" if st and st.source.modules else "none",
                "loaded_at": st.loaded_at if st else None, "last_error": self.last_error,
                "modules": [dict(m) for m in (st.modules if st else ())]}  # fmt: skip

    async def health(self) -> dict[str, Any]:
        """Liveness + identity (the pid lets a test kill this replica)."""
        return {"status": "ok" if self.state is not None else "loading", "pid": os.getpid(),
                "backbone": self.bb.fingerprint.model_id, "modules": sorted(self.state.versions) if self.state else [],
                "stats": dict(self.stats)}  # fmt: skip

    def check_health(self) -> None:
        """Serve's periodic probe: a replica without modules loaded is not healthy."""
        if self.state is None:
            raise RuntimeError("modules not loaded")
        if not self._engine.is_alive():
            raise RuntimeError("the decoding engine thread died")

    # ----------------------------------------------------------------------------------------- requests

    async def generate(self, row: RowRequest) -> RowResult:
        """One chat completion: joins the running batch at the next decode step. A caller that goes away (Serve
        cancels this call when the HTTP client disconnects or the ingress gives up) frees its row within a step."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[RowResult] = loop.create_future()
        job = _Job(row, done=lambda r: loop.call_soon_threadsafe(_resolve, fut, r))
        self._submit(job)
        try:
            return await fut
        finally:
            job.cancelled = True  # no-op once finished; otherwise the engine drops the row at its next step

    async def stream(self, row: RowRequest) -> AsyncIterator[StreamEvent]:
        """The same, as events (call with `handle.options(stream=True)`): start, deltas as tokens decode, end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        put = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)  # noqa: E731
        job = _Job(row, done=lambda r: put(StreamEvent(kind="end", result=r)), emit=put)
        self._submit(job)
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.kind == "end":
                    return
        finally:
            job.cancelled = True  # a client that went away stops its row at the next step

    def _submit(self, job: _Job) -> None:
        """Queue a job for the engine, or answer it at once: 429 when the queue is full, 503 before modules load."""
        if self.state is None:
            job.done(RowResult(error=Unavailable("modules are still loading", code="not_ready", retry_after_s=1.0).to_body()))
            return
        capacity = self.settings.max_batch_size + self.settings.max_queued_requests
        with self._held_lock:
            full = self._held >= capacity
            if not full:
                self._held += 1
        if full:
            self.stats["rejected"] += 1
            job.done(RowResult(error=Overloaded(
                f"the server is busy ({self.settings.max_batch_size} rows decoding and {self.settings.max_queued_requests} "
                "requests waiting); retry shortly", code="queue_full", retry_after_s=self.settings.retry_after_s).to_body()))  # fmt: skip
            return
        done = job.done

        def release(result: RowResult) -> None:  # the job's slot frees when it is answered, whatever the answer
            with self._held_lock:
                self._held -= 1
            done(result)

        job.done = release
        self._queue.append(job)
        self.stats["queued"] = len(self._queue)
        self._wake.set()

    def _engine_loop(self) -> None:
        """Iteration-level scheduling: before every decode step, drop cancelled rows and admit queued requests into
        free rows (their prefill is the only extra work); then one step for every running row."""
        from mosaic_core.scheduler import ContinuousBatcher

        batcher = ContinuousBatcher(self.bb.model, self.prefix_cache)
        running: dict[int, _Prepared] = {}
        ids = itertools.count()
        while True:  # a daemon thread: it ends with the replica process
            for key in [k for k, p in running.items() if p.job.cancelled]:
                batcher.cancel(key)
                self.stats["cancelled"] += 1
                running.pop(key).job.done(_GONE)
            self.stats["running"] = len(running)
            joining: list[tuple[int, _Prepared]] = []
            while self._queue and len(running) + len(joining) < self.settings.max_batch_size:
                job = self._queue.popleft()
                if job.cancelled:
                    self.stats["cancelled"] += 1
                    job.done(_GONE)
                    continue
                p = self._admit(job)
                if p is not None:
                    joining.append((next(ids), p))
            self.stats["queued"] = len(self._queue)
            if not running and not joining:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._join(batcher, running, joining)
                finished = batcher.step()
            except Exception as e:  # never let one bad step take the replica down: fail the rows it held
                logger.exception("decoding %d rows failed", len(running))
                for p in running.values():
                    p.job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
                running.clear()
                batcher = ContinuousBatcher(self.bb.model, self.prefix_cache)
                continue
            self._count_step(running.values())
            for key, g in finished:
                self._finish(running.pop(key), g)
            self.stats["running"] = len(running)

    def _admit(self, job: _Job) -> "_Prepared | None":
        """Validate and encode a queued job under the current modules; an invalid one is answered at once."""
        try:
            return self._prepare(self.state, job)
        except ApiError as e:
            job.done(RowResult(error=e.to_body()))
        except MosaicError as e:
            job.done(RowResult(error=_from_mosaic_error(e).to_body()))
        except Exception as e:  # never let one request take the replica (or its batch-mates) down
            logger.exception("preparing a request failed")
            job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
        return None

    def _join(self, batcher: Any, running: dict[int, "_Prepared"], joining: list[tuple[int, "_Prepared"]]) -> None:
        """Prefill the joining rows (one forward per module snapshot) into the running batch."""
        from mosaic_core.scheduler import RowSpec

        by_state: dict[int, list[tuple[int, _Prepared]]] = {}
        for key, p in joining:
            by_state.setdefault(id(p.state), []).append((key, p))
        for group in by_state.values():
            specs = []
            for key, p in group:
                r = p.job.row
                specs.append((key, RowSpec(p.segments, p.active, p.max_tokens, eos_token_ids=[] if r.ignore_eos else self.eos,
                                           temperature=r.temperature, top_p=r.top_p, seed=r.seed if r.temperature > 0 else None,
                                           should_stop=functools.partial(self._should_stop, p))))  # fmt: skip
            try:
                with self._prefix_lock:
                    batcher.join(specs, group[0][1].state.bank)
            except Exception as e:
                logger.exception("prefilling %d rows failed", len(group))
                for _, p in group:
                    p.job.done(RowResult(error=InternalError(f"internal error: {type(e).__name__}").to_body()))
                continue
            running.update(group)
            self.stats["joins"] += 1

    def _count_step(self, rows: Any) -> None:
        rows = list(rows)
        st, sets = self.stats, len({p.active for p in rows})
        st["batches"] += 1
        st["mixed_batches"] += sets > 1
        st["max_batch_rows"] = max(st["max_batch_rows"], len(rows))
        st["max_batch_active_sets"] = max(st["max_batch_active_sets"], sets)

    def _should_stop(self, p: "_Prepared", tokens: list[int]) -> bool:
        """After each new token of a row: a stop string ends it; a streaming row gets the text that is safe to send."""
        stops = p.job.row.stop
        if not stops and p.job.emit is None:
            return False
        text = self.bb.tokenizer.decode(tokens, skip_special_tokens=True)
        if stops and find_stop(text, stops) is not None:
            return True
        if p.job.emit is not None:
            safe = len(text) - holdback(text, stops)
            if safe > p.emitted:
                p.job.emit(StreamEvent(kind="delta", text=text[p.emitted : safe]))
                p.emitted = safe
        return False

    def _finish(self, p: "_Prepared", g: Any) -> None:
        text = self.bb.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        cut = find_stop(text, p.job.row.stop)
        reason = g.finish_reason
        if cut is not None:
            text, reason = text[:cut], "stop"
        if p.job.emit is not None and len(text) > p.emitted:
            p.job.emit(StreamEvent(kind="delta", text=text[p.emitted :]))
            p.emitted = len(text)
        p.job.done(self._result(p, text, reason, len(g.token_ids)))

    def _prepare(self, state: ModuleState, job: _Job) -> _Prepared:
        from mosaic_core.compose import encode_chat

        row = job.row
        active = state.canonical(row.active)
        placement = state.bank.placement if state.bank is not None else "before_assistant"
        try:
            segments = encode_chat(self.bb.tokenizer, row.messages, placement)
        except Exception as e:  # the chat template refuses e.g. roles out of order (jinja raise_exception)
            raise InvalidRequest(f"the chat template rejected these messages: {e}", param="messages") from None
        prompt = len(segments.before) + len(segments.after)
        control = len(active) * (state.bank.m if state.bank is not None else 0)
        room = self.context - prompt - control
        wanted = row.max_tokens if row.max_tokens is not None else min(self.settings.default_max_tokens, room)
        if room < 1 or wanted > room:
            raise InvalidRequest(
                f"this model's context is {self.context} tokens; the messages take {prompt} tokens plus {control} "
                f"control tokens, leaving {max(room, 0)}, and {wanted} new tokens were requested: shorten the messages "
                "or lower max_tokens", param="messages", code="context_length_exceeded")  # fmt: skip
        p = _Prepared(job, state, segments, active, wanted, prompt, control)
        self.stats["rows"] += 1
        if job.emit is not None:
            job.emit(StreamEvent(kind="start", result=self._result(p, "", None, 0)))
        return p

    @staticmethod
    def _result(p: _Prepared, text: str, reason: str | None, n: int) -> RowResult:
        versions = p.state.versions
        return RowResult(text=text, finish_reason=reason or "stop", prompt_tokens=p.prompt_tokens, completion_tokens=n,
                         control_tokens=p.control_tokens, active_modules=list(p.active),
                         module_versions={c: versions[c] for c in p.active})  # fmt: skip


_GONE = RowResult(error=Cancelled("the client went away", code="client_disconnected").to_body())
"""What a row whose caller went away is answered with (nobody reads it; the slot it held is released)."""


def _resolve(fut: "asyncio.Future[RowResult]", result: RowResult) -> None:
    if not fut.done():  # a cancelled caller's future stays cancelled
        fut.set_result(result)


# --------------------------------------------------------------------------------------------- ingress deployment


def _error_payload(e: ApiError | ErrorBody) -> dict[str, Any]:
    """The one error shape, OpenAI's."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error_response(e: ApiError) -> JSONResponse:
    body = _error_payload(e)
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse(body, status_code=e.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: malformed JSON, missing/unknown fields, wrong types, out-of-range values."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                              code="invalid_json")  # fmt: skip
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") == "model_attributes_type":
        return InvalidRequest("the request body must be a JSON object (Content-Type: application/json)", code="invalid_json")
    msg = "; ".join(_describe_validation(e) for e in errors[:5])
    kind = str(first.get("type", ""))
    code = ("unknown_parameter" if kind == "extra_forbidden"
            else "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")  # fmt: skip
    return InvalidRequest(msg or "invalid request", param=".".join(loc) or None, code=code)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------------------------- metrics and audit

AUDIT_LOGGER = "mosaic.audit"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
METRIC_TAGS = ("modules", "module_versions", "tenant")


class ServeMetrics:
    """Ray Serve custom metrics (`ray.serve.metrics`), exported through Ray's own Prometheus endpoint (prefixed
    `ray_`; Serve adds application/deployment/replica tags). Labels: the active module set (`alcohol+betting`,
    `none`), its versions (`alcohol=3,betting=2`) and the tenant (`open` without tenants)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("mosaic_requests", description="Chat completion requests, by HTTP status.",
                                tag_keys=(*METRIC_TAGS, "status"))  # fmt: skip
        self.refusals = Counter("mosaic_refusals", description="Answers that start with the refusal template.",
                                tag_keys=METRIC_TAGS)  # fmt: skip
        self.tokens = Counter("mosaic_tokens", description="Tokens: prompt, control (module) and completion.",
                              tag_keys=(*METRIC_TAGS, "kind"))  # fmt: skip
        self.latency = Histogram("mosaic_request_latency_s", description="Seconds from request to last byte of the answer.",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=METRIC_TAGS)  # fmt: skip

    def observe(self, rec: dict[str, Any]) -> None:
        tags = metric_tags(rec)
        self.requests.inc(tags={**tags, "status": str(rec["status"])})
        self.latency.observe(rec["latency_s"], tags=tags)
        if rec.get("refused"):
            self.refusals.inc(tags=tags)
        for kind in ("prompt", "control", "completion"):
            if rec.get(f"{kind}_tokens"):
                self.tokens.inc(rec[f"{kind}_tokens"], tags={**tags, "kind": kind})


def metric_tags(rec: dict[str, Any]) -> dict[str, str]:
    active = rec.get("active_modules") or []
    versions = rec.get("module_versions") or {}
    return {"modules": "+".join(active) or "none",
            "module_versions": ",".join(f"{c}={versions[c]}" for c in active if c in versions) or "none",
            "tenant": rec.get("tenant") or "open"}  # fmt: skip


def audit_logger(destination: str | None, max_bytes: int = 64 << 20, backups: int = 10) -> logging.Logger | None:
    """The audit trail's logger: JSON lines to stdout, or to `<dir>/audit-<pid>.jsonl` (one file per ingress replica
    process, rotated by RotatingFileHandler); None when off."""
    if destination in (None, "", "off"):
        return None
    from logging.handlers import RotatingFileHandler

    log = logging.getLogger(f"{AUDIT_LOGGER}.{os.getpid()}")
    log.setLevel(logging.INFO)
    log.propagate = False  # not into Serve's replica log format: the line must stay pure JSON
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if destination == "stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        folder = Path(destination)
        folder.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(folder / f"audit-{os.getpid()}.jsonl", maxBytes=max_bytes, backupCount=backups,
                                      encoding="utf-8")  # fmt: skip
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return log


def audit_record(rec: dict[str, Any], with_prompts: bool) -> dict[str, Any]:
    """The audit line of a finished request: who, which modules (requested, forced, active, versions), refused or
    not, token counts, latency, status; messages and answer only `with_prompts`."""
    keys = ("time", "request_id", "tenant", "model", "profile", "requested_modules", "forced_modules", "active_modules",
            "module_versions", "refused", "prompt_tokens", "control_tokens", "completion_tokens", "finish_reason",
            "latency_s", "status", "error_code", "stream")  # fmt: skip
    out = {k: rec.get(k) for k in keys}
    if with_prompts:
        out["messages"], out["answer"] = rec.get("messages"), rec.get("answer")
    return out


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class MosaicIngress:
    """OpenAI-compatible HTTP front: auth, module policy, validation, and the one error shape."""

    def __init__(self, backbone: DeploymentHandle, settings: dict[str, Any]) -> None:
        from pipelines import _loopback

        _loopback.install()  # this replica's internal gRPC server too
        self.backbone = backbone
        self.settings = IngressSettings.model_validate(settings)
        self.tenants = {d: t for t in self.settings.tenants for d in t.key_sha256}
        from mosaic_core.judge import TemplateJudge

        self.refusal = TemplateJudge(self.settings.refusal_template)
        self.metrics = ServeMetrics()
        self.audit = audit_logger(self.settings.audit_log, self.settings.audit_max_bytes, self.settings.audit_backup_count)
        # Graceful shutdown (drain): requests in flight, refuse new ones, cancel the rest at the deadline.
        self.in_flight, self.draining, self.abort = 0, False, asyncio.Event()
        if not self.tenants:
            logger.warning("no tenants configured (MOSAIC_TENANTS_FILE / MOSAIC_TENANTS): the endpoint is OPEN, "
                           "no API key is required and no module is mandatory")  # fmt: skip

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Built on the replica after __init__ (late-bound ingress): nothing is constructed at import time."""
        app = FastAPI(title="MOSAIC", description="OpenAI-compatible chat with composable safety modules")

        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return _error_response(exc)

        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            err = _validation_error(exc)
            if request.url.path.endswith("/chat/completions"):  # audited like every other request
                self.finish(self.begin(None), error=err)
            return _error_response(err)

        async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            cls = NotFound if exc.status_code == 404 else InvalidRequest
            err = cls(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
            err.status = exc.status_code
            return _error_response(err)

        async def crashed(_: Request, exc: Exception) -> JSONResponse:  # still one shape; Starlette logs the traceback
            return _error_response(InternalError(f"internal error: {type(exc).__name__}", code="internal_error"))

        app.add_exception_handler(ApiError, api_error)
        app.add_exception_handler(RequestValidationError, invalid)
        app.add_exception_handler(StarletteHTTPException, http_error)
        app.add_exception_handler(Exception, crashed)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, authorization: str | None = Header(None)) -> Any:
            rec = self.begin(body)
            streaming = False
            self.in_flight += 1
            try:
                if self.draining:
                    raise Unavailable("the server is shutting down; retry on another replica", code="shutting_down",
                                      retry_after_s=self.settings.retry_after_s)  # fmt: skip
                tenant = self.authenticate(authorization)
                rec["tenant"] = tenant.name if tenant else None
                response = await self.chat(body, tenant, rec)
                streaming = isinstance(response, StreamingResponse)  # its generator finishes the record
                if not streaming:
                    self.finish(rec)
                return response
            except ApiError as e:
                self.finish(rec, error=e)
                raise
            except Exception as e:
                self.finish(rec, error=InternalError(f"internal error: {type(e).__name__}", code="internal_error"))
                raise
            finally:
                if not streaming:
                    self.in_flight -= 1

        @app.get("/v1/models")
        async def models(authorization: str | None = Header(None)) -> dict[str, Any]:
            self.authenticate(authorization)
            return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "created": 0,
                                                "owned_by": "mosaic"}]}  # fmt: skip

        @app.get("/v1/modules")
        async def modules(authorization: str | None = Header(None)) -> dict[str, Any]:
            tenant = self.authenticate(authorization)
            info = await self.call(self.backbone.modules.remote())
            data = [{"id": m["category"], "object": "safety_module", **m} for m in info.pop("modules")]
            return {"object": "list", "data": data, **info,
                    "mandatory_modules": list(tenant.mandatory_modules) if tenant else []}  # fmt: skip

        @app.get("/v1/profiles")
        async def profiles(authorization: str | None = Header(None)) -> dict[str, Any]:
            tenant = self.authenticate(authorization)
            allowed = tenant.allowed_profiles if tenant and tenant.allowed_profiles is not None else None
            return {"object": "list", "data": [{"id": k, "object": "safety_profile", "modules": v,
                                                "allowed": allowed is None or k in allowed}
                                               for k, v in self.settings.profiles.items()]}  # fmt: skip

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            if self.draining:
                raise Unavailable("shutting down", code="shutting_down", retry_after_s=self.settings.retry_after_s)
            try:
                health = await asyncio.wait_for(self.call(self.backbone.health.remote()), timeout=10)
            except (ApiError, asyncio.TimeoutError) as e:
                raise Unavailable(f"backbone not ready: {getattr(e, 'message', 'timed out')}", code="not_ready",
                                  retry_after_s=1.0) from None  # fmt: skip
            if health.get("status") != "ok":
                raise Unavailable("backbone is loading its modules", code="not_ready", retry_after_s=1.0)
            return health

        return app

    # ----------------------------------------------------------------------------------------- policy

    def authenticate(self, authorization: str | None) -> TenantPolicy | None:
        """The caller's tenant from `Authorization: Bearer <key>`; None when the endpoint is open (no tenants)."""
        if not self.tenants:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
        tenant = self.tenants.get(_sha256(key.strip()))
        if tenant is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return tenant

    def effective_modules(self, body: ChatCompletionRequest, tenant: TenantPolicy | None) -> tuple[list[str], list[str]]:
        """(active set, forced modules) = tenant mandatory ∪ profile ∪ safety_modules, and what the tenant added."""
        chosen: list[str] = []
        if body.safety_profile is not None:
            if body.safety_profile not in self.settings.profiles:
                raise InvalidRequest(f"unknown safety_profile {body.safety_profile!r}; available: "
                                     f"{sorted(self.settings.profiles)}", param="safety_profile",
                                     code="unknown_profile")  # fmt: skip
            if tenant and tenant.allowed_profiles is not None and body.safety_profile not in tenant.allowed_profiles:
                raise Forbidden(f"tenant {tenant.name!r} may not use profile {body.safety_profile!r}; allowed: "
                                f"{tenant.allowed_profiles}", param="safety_profile", code="profile_not_allowed")  # fmt: skip
            chosen += self.settings.profiles[body.safety_profile]
        chosen += body.safety_modules or []
        mandatory = list(tenant.mandatory_modules) if tenant else []
        forced = [m for m in dict.fromkeys(mandatory) if m not in chosen]
        return list(dict.fromkeys(mandatory + chosen)), forced

    def row(self, body: ChatCompletionRequest, active: list[str]) -> RowRequest:
        """Validate what pydantic cannot (needs config or cross-field rules) and build the backbone's row."""
        if body.model != self.settings.model_name:
            raise NotFound(f"model {body.model!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        limit = self.settings.max_tokens_limit
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"max_tokens {max_tokens} is out of range: 1..{limit}", param="max_tokens",
                                 code="invalid_value")  # fmt: skip
        unsupported = {"n": body.n != 1, "logprobs": bool(body.logprobs), "presence_penalty": bool(body.presence_penalty),
                       "frequency_penalty": bool(body.frequency_penalty)}  # fmt: skip
        for name, bad in unsupported.items():
            if bad:
                raise InvalidRequest(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise InvalidRequest("the last message must come from the user", param="messages", code="invalid_value")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise InvalidRequest("messages contain no user text", param="messages", code="invalid_value")
        temperature = body.temperature if body.temperature is not None else self.settings.default_temperature
        return RowRequest(messages=messages, active=active, max_tokens=max_tokens, temperature=temperature,
                          top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=list(body.stop or []),
                          ignore_eos=body.ignore_eos)  # fmt: skip

    # ----------------------------------------------------------------------------------------- audit, drain

    def begin(self, body: ChatCompletionRequest | None) -> dict[str, Any]:
        """A request's audit record, filled in as it goes and written once by `finish`."""
        return {"request_id": f"chatcmpl-{uuid.uuid4().hex}", "t0": time.monotonic(), "tenant": None,
                "model": body.model if body else None, "profile": body.safety_profile if body else None,
                "requested_modules": list(body.safety_modules or []) if body else [], "forced_modules": [],
                "active_modules": [], "module_versions": {}, "refused": None, "prompt_tokens": 0,
                "control_tokens": 0, "completion_tokens": 0, "finish_reason": None, "status": None,
                "error_code": None, "stream": bool(body and body.stream), "answer": None,
                "messages": [m.model_dump(exclude_none=True) for m in body.messages] if body else None}  # fmt: skip

    def record_result(self, rec: dict[str, Any], result: RowResult) -> None:
        rec.update(active_modules=list(result.active_modules), module_versions=dict(result.module_versions),
                   prompt_tokens=result.prompt_tokens, control_tokens=result.control_tokens)  # fmt: skip
        if result.error is None:
            rec.update(completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                       answer=result.text, refused=self.refusal.is_refusal("", result.text))  # fmt: skip

    def finish(self, rec: dict[str, Any], error: ApiError | ErrorBody | None = None) -> None:
        """Close a request's record: one audit line, the metrics. Never raises (observability must not fail a request)."""
        if rec.get("status") is not None:
            return  # already written
        try:
            rec["latency_s"] = round(time.monotonic() - rec["t0"], 4)
            rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
            rec["status"] = error.status if error is not None else 200
            if error is not None:
                rec["error_code"] = error.code or error.type
            self.metrics.observe(rec)
            if self.audit is not None:
                self.audit.info(json.dumps(audit_record(rec, self.settings.audit_prompts), ensure_ascii=False,
                                           separators=(",", ":")))  # fmt: skip
        except Exception:  # noqa: BLE001
            logger.exception("writing the audit record / metrics failed")

    async def drain(self, timeout_s: float, grace_s: float = 3.0) -> dict[str, int]:
        """Stop taking requests (503 `shutting_down`, /healthz 503), let those in flight finish for up to
        `timeout_s`, then cancel what is left: each of those gets an error (in-band for streams), never silence."""
        loop = asyncio.get_running_loop()
        self.draining, start, at_start = True, loop.time(), self.in_flight
        logger.info("draining: %d request(s) in flight, up to %.1fs", at_start, timeout_s)
        while self.in_flight > 0 and loop.time() - start < timeout_s:
            await asyncio.sleep(0.05)
        cancelled = self.in_flight
        if cancelled:
            self.abort.set()
            t = loop.time()
            while self.in_flight > 0 and loop.time() - t < grace_s:
                await asyncio.sleep(0.05)
        return {"in_flight": at_start, "cancelled": cancelled, "left": self.in_flight}

    async def _abortable(self, response: Any) -> Any:
        """Await a backbone call unless a drain gives up on it first (then cancel it and raise 503)."""

        async def wait() -> Any:
            return await response

        if not self.abort.is_set():
            task, stopper = asyncio.ensure_future(wait()), asyncio.ensure_future(self.abort.wait())
            try:
                done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the HTTP client went away: cancel the backbone call, freeing its row
                task.cancel()
                _cancel_quietly(response)
                raise
            finally:
                stopper.cancel()
            if task in done:
                return task.result()
            task.cancel()
        if asyncio.iscoroutine(response):
            response.close()  # never started (e.g. a stream's __anext__): nothing to cancel, no "never awaited"
        _cancel_quietly(response)
        raise Unavailable("the server is shutting down: the request was cancelled before it finished",
                          code="shutting_down", retry_after_s=self.settings.retry_after_s)  # fmt: skip

    async def call(self, response: Any, cancel_with: Any = None) -> Any:
        """Await a backbone call; Serve's overload and availability failures become 429 / 503."""
        try:
            return await self._abortable(response)
        except Unavailable:
            if cancel_with is not None:  # a stream's __anext__ was abandoned: cancel the stream itself
                try:
                    cancel_with.cancel()
                except Exception:  # noqa: BLE001
                    pass
            raise
        except BackPressureError as e:
            raise Overloaded(f"the server is busy ({e}); retry shortly", code="queue_full",
                             retry_after_s=self.settings.retry_after_s) from None  # fmt: skip
        except (DeploymentUnavailableError, ReplicaUnavailableError) as e:
            raise Unavailable(f"backbone unavailable: {e}", code="unavailable", retry_after_s=1.0) from None
        except Exception as e:  # a replica that died mid-request (RayActorError...), restarting
            if type(e).__module__.startswith("ray"):
                raise Unavailable(f"backbone unavailable ({type(e).__name__}); retry shortly", code="unavailable",
                                  retry_after_s=1.0) from None  # fmt: skip
            raise

    # ----------------------------------------------------------------------------------------- chat

    async def chat(self, body: ChatCompletionRequest, tenant: TenantPolicy | None, rec: dict[str, Any]) -> Any:
        active, forced = self.effective_modules(body, tenant)
        rec.update(forced_modules=forced, active_modules=active)
        row = self.row(body, active)
        rid, created = rec["request_id"], int(time.time())
        if not body.stream:
            result: RowResult = await self.call(self.backbone.generate.remote(row))
            self.record_result(rec, result)
            if result.error is not None:
                result.error.raise_()
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.settings.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason, "logprobs": None}],
                    "usage": _usage(result), "mosaic": _mosaic(result, forced, body, tenant)}  # fmt: skip

        events = self.backbone.options(stream=True).stream.remote(row)
        first: StreamEvent = await self.call(events.__anext__(), cancel_with=events)
        if first.kind == "end" and first.result is not None and first.result.error is not None:
            self.record_result(rec, first.result)
            first.result.error.raise_()  # refused before any token: a plain JSON error, not a stream

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.settings.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}  # fmt: skip

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            ev: StreamEvent | None = first
            error: ApiError | ErrorBody | None = None
            try:
                try:
                    while ev is not None:
                        if ev.kind == "start" and ev.result is not None:
                            start = _mosaic(ev.result, forced, body, tenant)
                            yield _sse(chunk({"role": "assistant", "content": ""}, mosaic=start))
                        elif ev.kind == "delta" and ev.text:
                            yield _sse(chunk({"content": ev.text}))
                        elif ev.kind == "end" and ev.result is not None:
                            self.record_result(rec, ev.result)
                            if ev.result.error is not None:
                                err = error = ev.result.error
                                yield _sse(_error_payload(err))
                            else:
                                yield _sse(chunk({}, ev.result.finish_reason))
                                if include_usage:  # OpenAI: usage only when asked, once, on a final chunk of its own
                                    yield _sse({**chunk({}), "choices": [], "usage": _usage(ev.result)})
                            break
                        ev = await self.call(events.__anext__(), cancel_with=events)
                except ApiError as e:  # headers are gone: report in-band, as OpenAI does
                    error = e
                    yield _sse(_error_payload(e))
                except StopAsyncIteration:
                    pass
                yield "data: [DONE]\n\n"
            except BaseException as e:  # the client went away (GeneratorExit, cancelled): still audited, released
                error = InternalError(f"stream ended early: {type(e).__name__}", code="client_disconnected")
                error.status = 499
                raise
            finally:
                self.finish(rec, error=error)
                self.in_flight -= 1

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _cancel_quietly(response: Any) -> None:
    """Cancel a backbone call (a DeploymentResponse / stream) if it can be; best effort: the replica also drops a
    row whose caller is gone at its next decode step."""
    cancel = getattr(response, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:  # noqa: BLE001
            pass


def _usage(r: RowResult) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}  # fmt: skip


def _mosaic(r: RowResult, forced: list[str], body: ChatCompletionRequest, tenant: TenantPolicy | None) -> dict[str, Any]:
    return {"active_modules": r.active_modules, "module_versions": r.module_versions, "forced_modules": forced,
            "profile": body.safety_profile, "tenant": tenant.name if tenant else None,
            "control_tokens": r.control_tokens}  # fmt: skip


# --------------------------------------------------------------------------------------------- app builder


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (`import_path: pipelines.serve:build_app`). Validates everything at the driver."""
    cfg = ServeArgs.from_args(args)
    tenants = load_tenants(cfg.tenants_file, cfg.profiles)
    if not tenants:
        logger.warning("serve: no tenants configured, the endpoint will be open (no API key required)")
    source = cfg.module_source()
    bsettings = BackboneSettings(backbone=cfg.backbone, threads=cfg.threads, max_batch_size=cfg.max_batch_size,
                                 max_queued_requests=cfg.max_queued_requests, retry_after_s=cfg.retry_after_s,
                                 default_max_tokens=cfg.default_max_tokens, max_context_tokens=cfg.max_context_tokens)  # fmt: skip
    audit_log = cfg.audit_log
    if audit_log not in (None, "off", "stdout"):
        audit_log = str(Path(audit_log).expanduser().resolve())  # absolute here: replicas run elsewhere
    isettings = IngressSettings(model_name=cfg.served_name(), profiles=cfg.profiles, tenants=tenants,
                                max_tokens_limit=cfg.max_tokens_limit, default_temperature=cfg.default_temperature,
                                retry_after_s=cfg.retry_after_s, audit_log=audit_log, audit_prompts=cfg.audit_prompts,
                                audit_max_bytes=cfg.audit_max_bytes, audit_backup_count=cfg.audit_backup_count,
                                refusal_template=cfg.refusal_template)  # fmt: skip
    # The replica's own queue (max_queued_requests) is the one that pushes back, with a 429 at once: Serve may hand it
    # twice what it can hold, so Serve's router never has to refuse and retry a request (the extra ones get that 429).
    capacity = cfg.max_batch_size + cfg.max_queued_requests
    backbone = MosaicBackbone.options(
        num_replicas=cfg.num_replicas, max_ongoing_requests=2 * capacity, max_queued_requests=capacity,
        user_config=source.model_dump(),
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_cpus": cfg.num_cpus}, health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=max(30.0, 2 * cfg.health_check_period_s),
        graceful_shutdown_timeout_s=cfg.shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5,
    ).bind(bsettings.model_dump())  # fmt: skip
    # The ingress is cheap and async: let it hold every request the backbone could hold or queue, so the backbone's
    # bounded queue (-> 429 with our error body) is the one that pushes back.
    headroom = 4 * capacity * cfg.num_replicas
    return MosaicIngress.options(
        max_ongoing_requests=headroom, max_queued_requests=headroom, ray_actor_options={"num_cpus": 0},
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        graceful_shutdown_timeout_s=cfg.shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5,
    ).bind(backbone, isettings.model_dump())  # fmt: skip


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosaic serve", description="Serve composable safety modules behind an "
                                "OpenAI-compatible endpoint (Ray Serve). Blocks until Ctrl-C / SIGTERM.")  # fmt: skip
    p.add_argument("--backbone", default=EMBEDDED, help=f"HF id, local dir, or {EMBEDDED!r} (default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--modules", default=None, help="comma-separated module URIs or categories (registry; default: "
                     f"${ENV_MODULES})")  # fmt: skip
    src.add_argument("--bank", default=None, help="a local bank directory instead of the registry")
    p.add_argument("--alias", default=None, help="registry alias for bare categories (default production)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.add_argument("--tenants-file", default=None, help=f"tenants JSON/YAML (default ${ENV_TENANTS_FILE}); none: open")
    p.add_argument("--poll-interval", type=float, default=None, help="re-resolve aliases every N seconds")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch threads per backbone replica")
    p.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per backbone replica")
    p.add_argument("--args", default=None, help="a YAML/JSON file of build_app args (flags override it)")
    p.add_argument("--shutdown-timeout", type=float, default=None, help="on SIGTERM/SIGINT: stop accepting, let "
                   "requests in flight finish, cancel the rest with an error, and exit within this many seconds "
                   "(default 30)")  # fmt: skip
    p.add_argument("--audit-log", default=None, help="audit trail, one JSON line per request: 'stdout' (default; "
                   "the ingress replica's log), a directory (audit-<pid>.jsonl per replica process, rotated) "
                   "or 'off'")  # fmt: skip
    p.add_argument("--audit-prompts", action="store_true", default=None, help="also write messages and answers "
                   "into the audit log (off by default)")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None, help="port of Ray's Prometheus metrics endpoint on "
                   "127.0.0.1 (default: a free one, printed at start; ignored with $RAY_ADDRESS)")  # fmt: skip
    return p


SHUTDOWN_RESERVE_S = 10.0
"""Of the shutdown bound, what stopping Serve and Ray takes (measured 4-9 s on the 2-core box); the rest is drain."""


def _descendants(pid: int) -> set[int]:
    """Live descendants of `pid` (Ray's gcs/raylet/workers under this driver), from /proc; empty where there is none."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    out: set[int] = set()
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, ())
    return out


def _force_exit(bound: float) -> None:
    """The shutdown bound passed: kill what this process started (by PID) and exit non-zero."""
    print(f"mosaic serve: shutdown did not finish within {bound:.0f}s; killing its own processes", file=sys.stderr,
          flush=True)  # fmt: skip
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


def graceful_shutdown(bound_s: float, *, own_ray: bool) -> dict[str, Any]:
    """Drain the ingress (finish or cancel what is in flight), then stop Serve and, when this process started it,
    Ray -- all within `bound_s` (a watchdog enforces it)."""
    import ray

    t0 = time.monotonic()
    watchdog = threading.Timer(max(1.0, bound_s - 0.5), _force_exit, args=(bound_s,))
    watchdog.daemon = True
    watchdog.start()
    drain_s = max(0.5, bound_s - SHUTDOWN_RESERVE_S)
    report: dict[str, Any] = {}
    try:
        try:
            report = serve.get_app_handle(APP_NAME).drain.remote(drain_s).result(timeout_s=drain_s + 5)
            time.sleep(0.5)  # the proxy still has the last bytes of the answers to send
        except Exception as e:  # noqa: BLE001 - no app, a dead ingress...: still stop everything
            report = {"drain_error": f"{type(e).__name__}: {e}"}
        print(f"mosaic serve: drained {report} in {time.monotonic() - t0:.1f}s; stopping Serve", file=sys.stderr, flush=True)
        serve.shutdown()
        if own_ray:
            ray.shutdown()
    finally:
        watchdog.cancel()
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report


def cli(argv: list[str]) -> None:
    """`mosaic serve ...`: start Ray (local, or $RAY_ADDRESS) + Serve on host:port, block until Ctrl-C / SIGTERM,
    then shut Serve down cleanly. MosaicErrors propagate (pipelines/cli.py prints them, exit 2)."""
    a = build_parser().parse_args(argv)
    args: dict[str, Any] = {}
    if a.args:
        import yaml

        args = yaml.safe_load(Path(a.args).read_text()) or {}
    flags = {"backbone": a.backbone if a.backbone != EMBEDDED or "backbone" not in args else None,
             "modules": [m.strip() for m in a.modules.split(",") if m.strip()] if a.modules else None,
             "bank_dir": a.bank, "alias": a.alias, "tracking_uri": a.tracking_uri, "tenants_file": a.tenants_file,
             "poll_interval_s": a.poll_interval, "threads": a.threads, "num_cpus": a.num_cpus,
             "shutdown_timeout_s": a.shutdown_timeout, "audit_log": a.audit_log, "audit_prompts": a.audit_prompts}  # fmt: skip
    args.update({k: v for k, v in flags.items() if v is not None})
    app = build_app(args)  # validate before starting anything
    cfg = ServeArgs.from_args(args)

    import ray

    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kw: dict[str, Any] = {"address": address} if address else {"address": "local", "include_dashboard": False}
        if not address and a.metrics_port:
            kw["_metrics_export_port"] = a.metrics_port
        try:
            ray.init(**kw, runtime_env={"worker_process_setup_hook": "pipelines._loopback.install"}, log_to_driver=False)
        except Exception:
            ray.shutdown()  # a node that failed to start may have started some of its processes
            raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            print(f"mosaic serve: already shutting down (within {cfg.shutdown_timeout_s:.0f}s)", file=sys.stderr, flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = False
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        started = True
        node = getattr(ray._private.worker.global_worker, "node", None)  # None when connected to a cluster
        metrics = f"; Prometheus metrics at http://127.0.0.1:{node.metrics_export_port}/metrics" if node else ""
        print(f"mosaic serve: OpenAI-compatible endpoint at http://{a.host}:{a.port}/v1 "
              f"(model {cfg.served_name()!r}){metrics}; Ctrl-C to stop", flush=True)  # fmt: skip
        while not stop.wait(0.5):
            pass
        print(f"mosaic serve: shutting down (bound {cfg.shutdown_timeout_s:.0f}s)", file=sys.stderr, flush=True)
        graceful_shutdown(cfg.shutdown_timeout_s, own_ray=own_ray)
    finally:
        if not started:  # failed to start: still release what was started
            try:
                serve.shutdown()
            finally:
                if own_ray:
                    ray.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":  # `python -m pipelines.serve ...`
    try:
        cli(sys.argv[1:])
    except MosaicError as err:
        print(f"mosaic serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
