"""Deployment, Application and bind: what a user declares, and its flattening into plans."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import cloudpickle

from fleet._handle import DeploymentHandle
from fleet._nodes import MethodBinder
from fleet._plan import DeploymentPlan
from fleet._types import ProcessRole

if TYPE_CHECKING:
    from fleet._config import DeploymentConfig

T = TypeVar("T")



class Deployment:
    """A class or function that fleet runs as replicas. Made by :func:`fleet.deployment`.

    ``.options(...)`` returns a copy with some options changed; ``.bind(...)`` gives the
    constructor's arguments and returns an :class:`Application`.
    """

    def __init__(self, func_or_class: Callable[..., Any], config: DeploymentConfig | None,
                 unchecked: dict[str, Any] | None = None) -> None:
        self.func_or_class = func_or_class
        self._config = config
        self._unchecked = unchecked       # the options, while config is not made yet
        self.__doc__ = getattr(func_or_class, "__doc__", None)

    @property
    def config(self) -> DeploymentConfig:
        """The checked options (:class:`fleet.DeploymentConfig`)."""
        if self._config is None:
            self._config = _checked(self._unchecked or {})
        return self._config

    @property
    def name(self) -> str:
        """The deployment's name (the class or function name unless set)."""
        if self._config is None and self._unchecked is not None:
            return str(self._unchecked["name"])
        return self.config.name

    def options(self, **options: Any) -> Deployment:
        """A copy with these options overridden (same names as :func:`fleet.deployment`)."""
        merged = dict(self._unchecked or {}) if self._config is None \
            else self.config.model_dump()
        if "num_replicas" in options and "autoscaling_config" not in options:
            merged["autoscaling_config"] = None
        merged.update(options)
        return _make(self.func_or_class, merged)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Give the constructor's arguments; bound deployments among them become handles."""
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"deployment {self.name!r} cannot be called directly: use "
                        f"{self.name}.bind(...) and fleet.run(...), then call its handle")

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


class Application:
    """A deployment with its constructor arguments: the unit :func:`fleet.run` deploys.

    Other applications nested in the arguments (in lists, dicts and tuples too) are
    deployed alongside and reach the constructor as :class:`DeploymentHandle` objects.
    """

    def __init__(self, deployment: Deployment, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs
        # part of a deployment graph (fleet.dag): its handles give references first
        self._legacy_refs = False

    def __repr__(self) -> str:
        return f"Application(ingress={self.deployment.name!r})"

    def __getattr__(self, name: str) -> Any:
        # `app.method.bind(...)` in deployment graphs (fleet.dag)
        if name.startswith("_") and name != "__call__":
            raise AttributeError(name)
        return MethodBinder(self, name)


@overload
def deployment(_func_or_class: type[T], **options: Any) -> Deployment: ...
@overload
def deployment(_func_or_class: Callable[..., Any], **options: Any) -> Deployment: ...
@overload
def deployment(_func_or_class: None = None, **options: Any) -> Callable[[Any], Deployment]: ...


def deployment(_func_or_class: Any = None, **options: Any) -> Any:
    """Mark a class or function as a deployment.

    Use bare (``@fleet.deployment``) or with options
    (``@fleet.deployment(num_replicas=2, max_ongoing_requests=10)``). Options are those
    of :class:`fleet.DeploymentConfig`; an unknown one is a TypeError, a bad value a
    ValueError, each naming the option.
    """

    def wrap(target: Any) -> Deployment:
        if isinstance(target, Deployment):
            return target.options(**options)
        if not callable(target):
            raise TypeError(f"@fleet.deployment applies to a class or a function, "
                            f"not {type(target).__name__}")
        opts = dict(options)
        opts.setdefault("name", getattr(target, "__name__", "deployment"))
        return _make(target, opts)

    if _func_or_class is not None:
        return wrap(_func_or_class)
    return wrap


def _checked(options: dict[str, Any]) -> DeploymentConfig:
    from fleet._config import make_deployment_config
    return make_deployment_config(f"deployment {options.get('name')!r}", **options)


def _make(target: Any, options: dict[str, Any]) -> Deployment:
    if ProcessRole.replica:
        # checked on first use of .config, which a replica never makes
        return Deployment(target, None, options)
    return Deployment(target, _checked(options))


# -- flattening an application into deployment plans -------------------------------

class ClassRef:
    """An importable deployment target, pickled by name instead of by value."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def load(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj.func_or_class if isinstance(obj, Deployment) else obj


def _target_ref(target: Any) -> Any:
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname:
        return target
    try:
        ref = ClassRef(module, qualname)
        if ref.load() is target:
            return ref
    except Exception:
        pass
    return target


# inspect.getsource on a class parses the module with ast, which CPython 3.11 can fail
# with "AST constructor recursion depth mismatch" when two threads do it at once
# (gh-106905): fleet.run from several threads hashes source, so one thread at a time.
_source_lock = threading.Lock()


def _source_hash(target: Any) -> str:
    with _source_lock:
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError):
            return ""
    return hashlib.sha1(source.encode()).hexdigest()


def build_plans(app: Application, app_name: str,
                transform: Callable[[Any], Any] | None = None) -> list[DeploymentPlan]:
    """Flatten app into plans, ingress first; nested applications become handles."""
    if not isinstance(app, Application):
        raise TypeError(f"expected a fleet.Application (from Deployment.bind()), got "
                        f"{type(app).__name__}")
    plans: list[DeploymentPlan] = []
    names: dict[int, str] = {}
    taken: set[str] = set()

    def unique(name: str) -> str:
        if name not in taken:
            return name
        i = 1
        while f"{name}_{i}" in taken:
            i += 1
        return f"{name}_{i}"

    def visit(node: Application) -> str:
        if id(node) in names:
            return names[id(node)]
        name = unique(node.deployment.name)
        taken.add(name)
        names[id(node)] = name
        legacy = node._legacy_refs
        calls: list[str] = []       # the deployments this one gets handles to

        def replace(value: Any) -> Any:
            if transform is not None:
                value = transform(value)
            if isinstance(value, Application):
                child = visit(value)
                if child not in calls:
                    calls.append(child)
                handle = DeploymentHandle(child, app_name)
                return handle._with_legacy_refs() if legacy else handle
            if isinstance(value, list):
                return [replace(v) for v in value]
            if isinstance(value, tuple):
                return tuple(replace(v) for v in value)
            if isinstance(value, dict):
                return {k: replace(v) for k, v in value.items()}
            return value

        args = replace(node.args)
        kwargs = replace(node.kwargs)
        target = node.deployment.func_or_class
        ref = _target_ref(target)
        try:
            blob = cloudpickle.dumps((ref, args, kwargs), protocol=5)
        except Exception as exc:
            raise TypeError(f"deployment {name!r}: its class or constructor arguments "
                            f"cannot be serialized: {exc}") from exc
        code = hashlib.sha1(blob).hexdigest() + _source_hash(target)
        cfg = node.deployment.config
        if cfg.name != name:
            cfg = cfg.model_copy(update={"name": name})
        plans.append(DeploymentPlan(name=name, config=cfg, serialized_def=blob,
                                    code_version=code, legacy_refs=legacy,
                                    oip=getattr(target, "_fleet_oip", None),
                                    calls=tuple(calls)))
        return name

    root = visit(app)
    for p in plans:
        p.ingress = p.name == root
    plans.sort(key=lambda p: not p.ingress)
    return plans
