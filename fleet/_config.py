"""The one typed config model: every option, read from Python, YAML and the CLI alike."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# What a replica may ask of Ray: its resources and its runtime environment.
RAY_ACTOR_OPTIONS = frozenset({"num_cpus", "num_gpus", "memory", "resources", "runtime_env"})

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


class LoggingConfig(_Model):
    """How fleet's processes log (Ray Serve's keys), at the top level (``fleet.start``,
    YAML), per application (YAML) or per deployment.

    ``log_level`` (default ``"INFO"``) for the replica's (or proxy's) loggers;
    ``encoding``: ``"TEXT"`` (readable console lines, the default) or ``"JSON"`` (the
    console gets the same JSON lines as the files); ``enable_access_log`` (default
    true) for the proxies' one line per request (``http_options.access_log`` is an
    alias); ``logs_dir``: where the instance's log directory goes (top level only;
    default ``$XDG_STATE_HOME/fleet/logs``). Changing it does not restart replicas.
    """

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    encoding: Literal["TEXT", "JSON"] = "TEXT"
    enable_access_log: bool = True
    logs_dir: str | None = None

    @field_validator("log_level", "encoding", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class DeploymentConfig(_Model):
    """Every option of a deployment, with its default.

    ``num_replicas=1``; ``"auto"`` means autoscaling with the defaults of
    :class:`AutoscalingConfig`. ``max_ongoing_requests=100`` calls at once per replica,
    ``max_queued_requests=-1`` (no limit) waiting in each caller. Health is checked every
    ``health_check_period_s=10`` with ``health_check_timeout_s=30``; a stopping replica
    finishes its calls for up to ``graceful_shutdown_timeout_s=20``. A replica not ready
    ``startup_timeout_s=300`` after it was started is killed and fails the deployment.
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
    startup_timeout_s: float = Field(300.0, gt=0)
    ray_actor_options: dict[str, Any] | None = None
    max_replicas_per_node: int | None = Field(None, ge=1)
    is_driver_deployment: bool = False
    logging_config: LoggingConfig | None = None

    @field_validator("ray_actor_options")
    @classmethod
    def _check_ray_actor_options(cls, value: Any) -> Any:
        if value is None:
            return value
        unknown = sorted(set(value) - RAY_ACTOR_OPTIONS)
        if unknown:
            raise ValueError(f"ray_actor_options: unknown key(s) {', '.join(map(repr, unknown))}"
                             f"{did_you_mean(unknown[0], sorted(RAY_ACTOR_OPTIONS))}; valid keys "
                             f"are {', '.join(sorted(RAY_ACTOR_OPTIONS))}")
        for key in ("num_cpus", "num_gpus", "memory"):
            given = value.get(key)
            if given is not None and (isinstance(given, bool)
                                      or not isinstance(given, (int, float)) or given < 0):
                raise ValueError(f"ray_actor_options: {key} must be a number >= 0, "
                                 f"got {given!r}")
        resources = value.get("resources")
        if resources is not None and (not isinstance(resources, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v >= 0 for k, v in resources.items())):
            raise ValueError("ray_actor_options: resources must map resource names to "
                             f"numbers >= 0, got {resources!r}")
        env = value.get("runtime_env")
        if env is not None and not isinstance(env, dict):
            raise ValueError(f"ray_actor_options: runtime_env must be a mapping, got {env!r}")
        return value

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _check_num_replicas(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and value >= 0):
            return value
        raise ValueError('num_replicas must be a whole number >= 0 or "auto"')

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
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
    ``expose_errors=True`` (for development) adds an exception's type and message to
    error bodies, which otherwise say only what happened and the request's id.
    ``num_proxies`` proxy processes (``"auto"``: one per CPU) serve the one port, each
    with its own routers; more than one needs ``server="uvicorn"``.
    """

    server: Literal["uvicorn", "granian"] = "uvicorn"
    num_proxies: int | Literal["auto"] = 1
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535)
    middlewares: list[Any] = Field(default_factory=list)
    request_timeout_s: float | None = Field(None, gt=0)
    root_path: str = ""
    max_body_bytes: int = Field(100 * 1024 * 1024, gt=0)
    access_log: bool = True
    call_method_header: bool = True
    expose_errors: bool = False
    enabled: bool = True
    # Limits against slow, greedy or malicious clients (see the README's HTTP limits).
    max_header_bytes: int = Field(65536, gt=0)
    max_headers: int = Field(100, gt=0)
    max_request_line_bytes: int = Field(8192, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(10000, gt=0)
    max_buffered_body_bytes: int = Field(256 * 1024 * 1024, gt=0)
    # TLS (Ray's key names): both set serve the HTTP proxy and the management server
    # over HTTPS with this PEM key and certificate.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    _check_num_proxies = field_validator("num_proxies", mode="before")(
        lambda cls, value: _num_proxies(value))

    @model_validator(mode="after")
    def _check_server(self) -> HTTPOptions:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("http_options: set both ssl_keyfile and ssl_certfile for TLS, "
                             "or neither")
        if self.server == "granian" and self.ssl_certfile is not None:
            raise ValueError("http_options ssl_keyfile/ssl_certfile need server='uvicorn'")
        if self.server == "granian" and proxy_count(self.num_proxies) > 1:
            raise ValueError("http_options num_proxies > 1 needs server='uvicorn' (Granian "
                             "binds its port itself and cannot share it)")
        return self


def _num_proxies(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and value >= 1):
        return value
    raise ValueError('num_proxies must be a whole number >= 1 or "auto"')


def proxy_count(num_proxies: int | str) -> int:
    """How many proxy processes num_proxies asks for on this machine."""
    if num_proxies == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    return int(num_proxies)


class GRPCOptions(_Model):
    """The gRPC proxy: its port and the servicer functions of user schemas.

    ``expose_errors=True`` (for development) adds an exception's type and message to
    error details, which otherwise say only what happened. ``num_proxies`` gRPC proxy
    processes (``"auto"``: one per CPU) serve the port, each with its own routers."""

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    num_proxies: int | Literal["auto"] = 1
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: float | None = Field(None, gt=0)
    expose_errors: bool = False
    enabled: bool = False

    _check_num_proxies = field_validator("num_proxies", mode="before")(
        lambda cls, value: _num_proxies(value))


DEFAULT_MANAGEMENT_PORT = 8100


class ManagementOptions(_Model):
    """The management server (REST API, dashboard, metrics) of an instance.

    It listens on ``host``:``port`` (loopback 127.0.0.1:8100 by default) and every path
    needs the instance's token, except ``/metrics`` when ``metrics_public`` is true.
    ``token`` fixes the token (default: a new random one per instance)."""

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_MANAGEMENT_PORT, ge=0, le=65535)
    metrics_public: bool = False
    token: str | None = Field(None, min_length=16)


# Ray Serve config keys fleet accepts so Ray users can bring their files, and ignores
# (with one warning naming them): where in the file -> keys.
RAY_ONLY_KEYS: dict[str, frozenset[str]] = {
    "top": frozenset({"target_capacity"}),
    "application": frozenset({"external_scaler_enabled"}),
    "deployment": frozenset({"graceful_shutdown_wait_loop_s", "placement_group_bundles",
                             "placement_group_strategy", "request_router_config"}),
}


class DeploymentOverride(_Model):
    """Per-deployment overrides in a YAML application: ``name`` and any option of
    :class:`DeploymentConfig`. The options are read from that model, so the two cannot
    drift apart; each value is checked by it too. Ray Serve's deployment keys that fleet
    does not use (:data:`RAY_ONLY_KEYS`) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    name: str

    @model_validator(mode="after")
    def _check(self) -> DeploymentOverride:
        try:
            make_deployment_config(f"deployment {self.name!r}", **self.overrides(),
                                   name=self.name)
        except TypeError as exc:   # an unknown option: pydantic reports ValueErrors
            raise ValueError(str(exc)) from None
        return self

    def overrides(self) -> dict[str, Any]:
        """The options given (those set to null are left at the deployment's own)."""
        return {k: v for k, v in (self.model_extra or {}).items()
                if v is not None and k not in RAY_ONLY_KEYS["deployment"]}

    def ignored(self) -> list[str]:
        """Ray-only keys given, which fleet ignores."""
        return sorted(k for k in (self.model_extra or {}) if k in RAY_ONLY_KEYS["deployment"])


class ApplicationConfig(_Model):
    """One application in a YAML config."""

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentOverride] = Field(default_factory=list)
    # every deployment of the application that sets none of its own
    logging_config: LoggingConfig | None = None
    # On Ray: every deployment's runtime_env, under what its own ray_actor_options set
    # (see merge_runtime_env); the local backend ignores it as it ignores ray_actor_options
    runtime_env: dict[str, Any] | None = None
    # a Ray Serve key, accepted and ignored
    external_scaler_enabled: bool | None = None


def merge_runtime_env(application: dict[str, Any], deployment: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """A deployment's runtime_env under its application's, as Ray Serve merges them: the
    deployment's keys win, except ``env_vars``, which are merged (the deployment's value
    wins for a variable both set)."""
    own = dict(deployment or {})
    merged = {**application, **own}
    if "env_vars" in application and "env_vars" in own:
        merged["env_vars"] = {**application["env_vars"], **own["env_vars"]}
    return merged


class TrafficConfig(_Model):
    """A route's traffic policy in YAML: ``weights`` by application for
    :func:`fleet.set_traffic`, ``shadow`` fractions by application for
    :func:`fleet.shadow_traffic`."""

    route_prefix: str
    weights: dict[str, float] = Field(default_factory=dict)
    shadow: dict[str, float] = Field(default_factory=dict)


ProxyLocation = Literal["EveryNode", "HeadOnly", "Disabled"]


class FleetConfig(_Model):
    """A whole instance as YAML: proxies and applications; ``backend: ray`` runs it on
    the Ray cluster at ``ray_address`` with proxies where ``proxy_location`` says."""

    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    proxy_location: ProxyLocation = "EveryNode"
    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    grpc_options: GRPCOptions = Field(default_factory=GRPCOptions)
    applications: list[ApplicationConfig] = Field(default_factory=list)
    traffic: list[TrafficConfig] = Field(default_factory=list)
    logging_config: LoggingConfig | None = None
    # Ray Serve keys, accepted and ignored
    target_capacity: float | None = None

    def ignored_keys(self) -> list[str]:
        """Where the file set Ray Serve keys that fleet ignores, as dotted paths."""
        out = [k for k in sorted(RAY_ONLY_KEYS["top"]) if getattr(self, k) is not None]
        for i, app in enumerate(self.applications):
            out += [f"applications.{i}.{k}" for k in sorted(RAY_ONLY_KEYS["application"])
                    if getattr(app, k) is not None]
            for j, dep in enumerate(app.deployments):
                out += [f"applications.{i}.deployments.{j}.{k}" for k in dep.ignored()]
        return out


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file, for editors: FleetConfig's, with each
    deployment override listing every option of DeploymentConfig."""
    schema = FleetConfig.model_json_schema()
    deployment = DeploymentConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs.update(deployment.pop("$defs", {}))
    properties = dict(deployment["properties"])
    for key in sorted(RAY_ONLY_KEYS["deployment"]):
        properties[key] = {"description": "Ray Serve key; fleet ignores it"}
    defs["DeploymentOverride"] = {
        "title": "DeploymentOverride", "type": "object", "required": ["name"],
        "description": DeploymentOverride.__doc__, "properties": properties,
        "additionalProperties": False}
    return schema


# Parts of a pydantic error location that name a branch of a union, not a field:
# ("num_replicas", "int") and ("num_replicas", "literal['auto']") are one option.
_BRANCH = re.compile(r"^(int|float|str|bool|none|literal\[.*\]|dict\[.*\]|list\[.*\]|"
                     r"function-\w+\[.*\]|[A-Z]\w*)$")

_PHRASES = {
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be a string", "string_too_short": "must not be empty",
    "missing": "is required", "list_type": "must be a list",
    "dict_type": "must be a mapping of options", "model_type": "must be a mapping of options",
    "model_attributes_type": "must be a mapping of options",
}


def _phrase(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PHRASES:
        return _PHRASES[kind]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}
    if kind in bounds:
        key = {">=": "ge", ">": "gt", "<=": "le", "<": "lt"}[bounds[kind]]
        limit = ctx.get(key)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {bounds[kind]} {limit}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def _models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [_Model]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds, through Optional, lists and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def option_names(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The valid option names at loc inside model (empty when unknown)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []


def did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_errors(exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    """Each problem as (location, sentence in a user's words), one per option."""
    model = _models().get(exc.title)
    grouped: dict[tuple[Any, ...], list[Any]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _BRANCH.match(p)))
        grouped.setdefault(loc, []).append(err)
    out = []
    for loc, errs in grouped.items():
        path = ".".join(str(p) for p in loc)
        first = errs[0]
        if first["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), option_names(model, loc[:-1]))
            out.append((loc, f"unknown option {path!r}{hint}"))
            continue
        phrases = list(dict.fromkeys(_phrase(e) for e in errs))
        if all(p.startswith("must be ") for p in phrases):
            rest = [p.removeprefix("must be ").removeprefix("one of ") for p in phrases[1:]]
            phrases = [phrases[0], *rest]
        text = " or ".join(phrases)
        leaf = str(loc[-1]) if loc else ""
        if first["type"] != "value_error" or not text.startswith(leaf):
            text = f"{path} {text}" if path else text
        elif path != leaf:
            text = f"{path[: -len(leaf)]}{text}"
        given = first.get("input")
        if first["type"] != "missing" and not isinstance(given, (dict, BaseModel)) \
                and ", got " not in text:
            text += f", got {given!r}"
        out.append((loc, text))
    return out


def validation_message(exc: ValidationError, where: str) -> str:
    """One readable line for all problems: which option, what is wrong, what was given."""
    return "; ".join(f"{where}: {text}" for _loc, text in describe_errors(exc))


def make_deployment_config(where: str, **options: Any) -> DeploymentConfig:
    """Validate options, raising TypeError for unknown names and ValueError for bad values."""
    unknown = sorted(set(options) - DEPLOYMENT_OPTIONS)
    if unknown:
        hint = did_you_mean(unknown[0], sorted(DEPLOYMENT_OPTIONS)) if len(unknown) == 1 else ""
        raise TypeError(f"{where}: unknown deployment option(s) {', '.join(unknown)}{hint}; "
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
