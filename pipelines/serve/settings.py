"""Configuration of the serve app: what `build_app` takes (ServeArgs: the `args:` of cluster/serve_config.yaml, or
`mosaic serve` flags), the modules the backbone serves (ModuleSource: its live `user_config`) and the init args of
the two deployments (BackboneSettings, IngressSettings). Tenants: pipelines/serve/tenants.py."""

import os
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mosaic_core.backbone import EMBEDDED
from mosaic_core.categories import CATEGORIES
from mosaic_core.config import DEFAULT_REFUSAL
from mosaic_core.errors import ConfigError
from pipelines.serve.errors import _describe_validation
from pipelines.serve.tenants import TenantPolicy

APP_NAME = "mosaic"
BACKBONE_DEPLOYMENT, INGRESS_DEPLOYMENT = "MosaicBackbone", "MosaicIngress"
DEFAULT_PROFILES: dict[str, list[str]] = {"minor": list(CATEGORIES), "none": []}
ENV_MODULES, ENV_BANK_DIR, ENV_ALIAS = "MOSAIC_SERVE_MODULES", "MOSAIC_BANK_DIR", "MOSAIC_MODULE_ALIAS"


class ModuleSource(BaseModel):
    """Which modules the backbone deployment serves: its `user_config`, the only part that changes live.

    Edit it in cluster/serve_config.yaml (`deployments: [{name: MosaicBackbone, user_config: ...}]`) and `serve
    deploy` again: Serve calls `reconfigure` on the running replicas (changing `args` instead rebuilds the app)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: list[str] = Field(
        default_factory=list,
        description="Registry modules: `models:/<name>@<alias>`, "
        "`models:/<name>/<version>`, or a bare category "
        "(`mosaic.<backbone>.<category>@<alias>`).",
    )
    alias: str = Field("production", description="Registry alias used for bare category names.")
    bank_dir: str | None = Field(None, description="A local bank directory (absolute) instead of the registry.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI in the replica's environment)."
    )
    poll_interval_s: float | None = Field(
        None, gt=0, description="Re-resolve aliases every N seconds and swap when a version moved (None: only on reconfigure)."
    )
    revision: str | None = Field(None, description="Free-form; change it to force a re-resolve of unchanged aliases.")

    @model_validator(mode="after")
    def _consistent(self) -> "ModuleSource":
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        """What the fields get wrong together (a subclass adds its own): all of it in one error."""
        return ["give modules (registry) or bank_dir (local bank), not both"] if self.modules and self.bank_dir else []

    def uris(self, backbone_id: str) -> list[str]:
        """Every module as a `models:/` URI; bare categories named after the backbone actually loaded."""
        from mosaic_core.bundle import registered_name

        return [
            m if m.startswith("models:/") else f"models:/{registered_name(backbone_id, m)}@{self.alias}" for m in self.modules
        ]


class ServeArgs(ModuleSource):
    """Arguments of `build_app` (the `args:` of cluster/serve_config.yaml, or `mosaic serve` flags).

    The module fields (modules, alias, bank_dir, tracking_uri, poll_interval_s, revision) are ModuleSource's: they
    become the backbone's first `user_config` through `module_source`, which makes bank_dir absolute and resolves
    tracking_uri (default MLFLOW_TRACKING_URI, else runs/mlflow.db) here at the driver.

    Unset module/tenant fields fall back to the environment: MOSAIC_SERVE_MODULES (comma-separated), MOSAIC_BANK_DIR,
    MOSAIC_MODULE_ALIAS, MLFLOW_TRACKING_URI, MOSAIC_TENANTS_FILE, MOSAIC_TENANTS (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(EMBEDDED, description="HF id, local model dir, or the embedded default.")
    model_name: str | None = Field(None, description="Name served by /v1/models (default: the backbone's id).")
    profiles: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_PROFILES.items()},
        description="Named module sets a request can pick with `safety_profile`.",
    )
    tenants_file: str | None = Field(None, description="JSON/YAML tenants file (never in the repo).")
    threads: int = Field(2, ge=1, le=256, description="torch intra-op threads per backbone replica.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per backbone replica.")
    num_replicas: int = Field(1, ge=1, description="Backbone replicas (each holds the model and all modules).")
    max_batch_size: int = Field(
        16,
        ge=1,
        le=256,
        description="Rows decoding together in a backbone replica (the "
        "running batch: requests join and leave it between decode steps).",
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Requests a replica keeps waiting for a free row; beyond that: 429 with Retry-After at once."
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 429.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none (capped by context).")
    default_temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Temperature when a request gives none: greedy, "
        "because modules were trained against the base model's greedy answers.",
    )
    max_context_tokens: int | None = Field(
        None, ge=8, description="Prompt + control + new tokens budget (default: the model's max_position_embeddings)."
    )
    health_check_period_s: float = Field(5.0, gt=0, description="How often Serve checks a backbone replica.")
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a replica Serve stops (shutdown, redeploy) "
        "may finish its in-flight requests (graceful_shutdown_timeout_s).",
    )
    audit_log: str | None = Field(
        "stdout",
        description="Audit trail, one JSON line per request: `stdout` (the "
        "ingress replica's log), a directory (one `audit-<pid>.jsonl` per ingress replica "
        "process, rotated), or `off`.",
    )
    audit_prompts: bool = Field(False, description="Also write messages and answers into the audit log.")
    audit_max_bytes: int = Field(64 << 20, ge=1024, description="Rotate an audit file at this size.")
    audit_backup_count: int = Field(10, ge=0, description="Rotated audit files kept per replica process.")
    refusal_template: str = Field(DEFAULT_REFUSAL, description="An answer starting with it counts as a refusal (metrics, audit).")

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = [k for k in v if not k or not k.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"profile names must be alphanumeric (- and _ allowed): {bad}")
        return v

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append(f"default_max_tokens {self.default_max_tokens} > max_tokens_limit {self.max_tokens_limit}")
        return problems

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

        source = self.model_dump(include=set(ModuleSource.model_fields))
        source["bank_dir"] = str(Path(self.bank_dir).expanduser().resolve()) if self.bank_dir else None
        source["tracking_uri"] = resolve_tracking_uri(self.tracking_uri) if self.modules else self.tracking_uri
        return ModuleSource(**source)


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
