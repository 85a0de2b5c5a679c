"""The one typed config model: every option, read from Python, YAML and the CLI alike."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=False)


class AutoscalingConfig(_Model):
    """How a deployment scales on the in-flight and queued calls its callers report.

    Defaults: ``min_replicas=1``, ``max_replicas=10``, ``initial_replicas=min_replicas``,
    ``target_ongoing_requests=2``, ``upscale_delay_s=3``, ``downscale_delay_s=60``,
    ``look_back_period_s=10``.
    """

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(10, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling_config: min_replicas ({self.min_replicas}) is "
                             f"greater than max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("autoscaling_config: initial_replicas must lie between "
                             "min_replicas and max_replicas")
        return self


class DeploymentConfig(_Model):
    """Every option of a deployment, with its default.

    ``num_replicas=1``; ``"auto"`` means autoscaling with the defaults of
    :class:`AutoscalingConfig`. ``max_ongoing_requests=100`` calls at once per replica,
    ``max_queued_requests=-1`` (no limit) waiting in each caller. Health is checked every
    ``health_check_period_s=10`` with ``health_check_timeout_s=30``; a stopping replica
    finishes its calls for up to ``graceful_shutdown_timeout_s=20``.
    """

    name: str = Field(min_length=1)
    num_replicas: int | Literal["auto"] = 1
    max_ongoing_requests: int = Field(100, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    ray_actor_options: dict[str, Any] | None = None
    is_driver_deployment: bool = False

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if isinstance(self.num_replicas, int) and self.num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0 or 'auto', got {self.num_replicas}")
        if self.num_replicas == "auto" and self.autoscaling_config is None:
            self.autoscaling_config = AutoscalingConfig()
        return self

    def target_replicas(self) -> int:
        """Replicas to start with: fixed count, or the autoscaler's starting point."""
        if self.is_driver_deployment:
            return 1
        if self.autoscaling_config is not None:
            a = self.autoscaling_config
            return a.initial_replicas if a.initial_replicas is not None else a.min_replicas
        assert isinstance(self.num_replicas, int)
        return self.num_replicas


DEPLOYMENT_OPTIONS = frozenset(DeploymentConfig.model_fields)


class HTTPOptions(_Model):
    """The HTTP proxy: where it listens and what wraps every route.

    ``server`` picks the proxy's HTTP server: ``"uvicorn"`` (httptools, the default) or
    ``"granian"`` (Rust, embedded in the proxy process; needs ``pip install granian``).
    """

    server: Literal["uvicorn", "granian"] = "uvicorn"
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535)
    middlewares: list[Any] = Field(default_factory=list)
    request_timeout_s: float | None = Field(None, gt=0)
    root_path: str = ""
    max_body_bytes: int = Field(100 * 1024 * 1024, gt=0)
    access_log: bool = True
    enabled: bool = True
    # Limits against slow, greedy or malicious clients (see the README's HTTP limits).
    max_header_bytes: int = Field(65536, gt=0)
    max_headers: int = Field(100, gt=0)
    max_request_line_bytes: int = Field(8192, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(10000, gt=0)
    max_buffered_body_bytes: int = Field(256 * 1024 * 1024, gt=0)


class GRPCOptions(_Model):
    """The gRPC proxy: its port and the servicer functions of user schemas."""

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: float | None = Field(None, gt=0)
    enabled: bool = False


class DeploymentOverride(_Model):
    """Per-deployment overrides in a YAML application (any deployment option)."""

    name: str
    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    user_config: Any = None
    autoscaling_config: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None
    ray_actor_options: dict[str, Any] | None = None

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class ApplicationConfig(_Model):
    """One application in a YAML config."""

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentOverride] = Field(default_factory=list)


class TrafficConfig(_Model):
    """A route's traffic policy in YAML: ``weights`` by application for
    :func:`fleet.set_traffic`, ``shadow`` fractions by application for
    :func:`fleet.shadow_traffic`."""

    route_prefix: str
    weights: dict[str, float] = Field(default_factory=dict)
    shadow: dict[str, float] = Field(default_factory=dict)


class FleetConfig(_Model):
    """A whole instance as YAML: proxies and applications."""

    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    grpc_options: GRPCOptions = Field(default_factory=GRPCOptions)
    applications: list[ApplicationConfig] = Field(default_factory=list)
    traffic: list[TrafficConfig] = Field(default_factory=list)


def validation_message(exc: ValidationError, where: str) -> str:
    """One readable line per problem: which option, what is wrong."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown option {loc!r}")
        else:
            lines.append(f"{where}: option {loc!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def make_deployment_config(where: str, **options: Any) -> DeploymentConfig:
    """Validate options, raising TypeError for unknown names and ValueError for bad values."""
    unknown = sorted(set(options) - DEPLOYMENT_OPTIONS)
    if unknown:
        raise TypeError(f"{where}: unknown deployment option(s) {', '.join(unknown)}; "
                        f"valid options are {', '.join(sorted(DEPLOYMENT_OPTIONS))}")
    try:
        return DeploymentConfig(**options)
    except ValidationError as exc:
        raise ValueError(validation_message(exc, where)) from None


def coerce_options(model: type[_Model], value: Any, where: str) -> Any:
    """Accept a model, a dict or None for http_options/grpc_options."""
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be a dict or {model.__name__}, got {type(value).__name__}")
    try:
        return model(**value)
    except ValidationError as exc:
        raise ValueError(validation_message(exc, where)) from None
