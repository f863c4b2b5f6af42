"""Tenants: who may call the endpoint and what they get. `load_tenants` reads the tenants file (keys hashed at once),
`authenticate` maps `Authorization: Bearer <key>` to a tenant, `effective_modules` merges a tenant's mandatory
modules with the request's profile and modules."""

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mosaic_core.errors import ConfigError
from pipelines.serve.errors import Forbidden, InvalidRequest, Unauthorized, _describe_validation
from pipelines.serve.schema import ChatCompletionRequest

ENV_TENANTS_FILE, ENV_TENANTS = "MOSAIC_TENANTS_FILE", "MOSAIC_TENANTS"


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
            tenants.append(
                TenantPolicy(
                    name=str(name),
                    key_sha256=digests,
                    mandatory_modules=entry.mandatory_modules,
                    allowed_profiles=entry.allowed_profiles,
                )
            )
    if problems:
        raise ConfigError(problems, "tenants")
    return tenants


def authenticate(tenants: dict[str, TenantPolicy], authorization: str | None) -> TenantPolicy | None:
    """The caller's tenant (`tenants`: key digest -> policy) from `Authorization: Bearer <key>`; None when the
    endpoint is open (no tenants)."""
    if not tenants:
        return None
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    tenant = tenants.get(_sha256(key.strip()))
    if tenant is None:
        raise Unauthorized("invalid API key", code="invalid_api_key")
    return tenant


def effective_modules(
    profiles: dict[str, list[str]], body: ChatCompletionRequest, tenant: TenantPolicy | None
) -> tuple[list[str], list[str]]:
    """(active set, forced modules) = tenant mandatory ∪ profile ∪ safety_modules, and what the tenant added."""
    chosen: list[str] = []
    if body.safety_profile is not None:
        if body.safety_profile not in profiles:
            raise InvalidRequest(
                f"unknown safety_profile {body.safety_profile!r}; available: {sorted(profiles)}",
                param="safety_profile",
                code="unknown_profile",
            )
        if tenant and tenant.allowed_profiles is not None and body.safety_profile not in tenant.allowed_profiles:
            raise Forbidden(
                f"tenant {tenant.name!r} may not use profile {body.safety_profile!r}; allowed: {tenant.allowed_profiles}",
                param="safety_profile",
                code="profile_not_allowed",
            )
        chosen += profiles[body.safety_profile]
    chosen += body.safety_modules or []
    mandatory = list(tenant.mandatory_modules) if tenant else []
    forced = [m for m in dict.fromkeys(mandatory) if m not in chosen]
    return list(dict.fromkeys(mandatory + chosen)), forced
