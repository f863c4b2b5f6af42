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

Layout: `app` (build_app) and the two deployments `backbone` (MosaicBackbone) and `ingress` (MosaicIngress);
`schema` (OpenAI request models, rows) and `errors` (ApiError, the OpenAI error shape); `tenants` (TenantPolicy,
load_tenants, authenticate, effective_modules); `settings` (ServeArgs, ModuleSource, the deployments' init args);
`modules` (ModuleState, load_modules); `observability` (ServeMetrics, the audit log); `cli` (`mosaic serve`, graceful
shutdown). The process environment is set by the `pipelines` package, imported first.
"""

from pipelines.serve.app import build_app
from pipelines.serve.backbone import MosaicBackbone
from pipelines.serve.cli import SHUTDOWN_RESERVE_S, build_parser, cli, graceful_shutdown
from pipelines.serve.errors import (
    ApiError,
    Cancelled,
    ErrorBody,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unauthorized,
    Unavailable,
)
from pipelines.serve.ingress import MosaicIngress
from pipelines.serve.modules import ModuleLoader, ModuleState, load_modules
from pipelines.serve.observability import (
    AUDIT_LOGGER,
    LATENCY_BUCKETS_S,
    METRIC_TAGS,
    ServeMetrics,
    audit_logger,
    audit_record,
    metric_tags,
)
from pipelines.serve.schema import (
    SEED_MAX,
    ChatCompletionRequest,
    ChatMessage,
    RowRequest,
    RowResult,
    StreamEvent,
    StreamOptions,
    TextPart,
)
from pipelines.serve.settings import (
    APP_NAME,
    BACKBONE_DEPLOYMENT,
    DEFAULT_PROFILES,
    ENV_ALIAS,
    ENV_BANK_DIR,
    ENV_MODULES,
    INGRESS_DEPLOYMENT,
    BackboneSettings,
    IngressSettings,
    ModuleSource,
    ServeArgs,
)
from pipelines.serve.tenants import ENV_TENANTS, ENV_TENANTS_FILE, TenantPolicy, authenticate, effective_modules, load_tenants

__all__ = [
    "APP_NAME",
    "AUDIT_LOGGER",
    "BACKBONE_DEPLOYMENT",
    "DEFAULT_PROFILES",
    "ENV_ALIAS",
    "ENV_BANK_DIR",
    "ENV_MODULES",
    "ENV_TENANTS",
    "ENV_TENANTS_FILE",
    "INGRESS_DEPLOYMENT",
    "LATENCY_BUCKETS_S",
    "METRIC_TAGS",
    "SEED_MAX",
    "SHUTDOWN_RESERVE_S",
    "ApiError",
    "BackboneSettings",
    "Cancelled",
    "ChatCompletionRequest",
    "ChatMessage",
    "ErrorBody",
    "Forbidden",
    "IngressSettings",
    "InternalError",
    "InvalidRequest",
    "ModuleLoader",
    "ModuleSource",
    "ModuleState",
    "MosaicBackbone",
    "MosaicIngress",
    "NotFound",
    "Overloaded",
    "RowRequest",
    "RowResult",
    "ServeArgs",
    "ServeMetrics",
    "StreamEvent",
    "StreamOptions",
    "TenantPolicy",
    "TextPart",
    "Unauthorized",
    "Unavailable",
    "audit_logger",
    "audit_record",
    "build_app",
    "build_parser",
    "cli",
    "graceful_shutdown",
    "load_modules",
    "authenticate",
    "effective_modules",
    "load_tenants",
    "metric_tags",
]
