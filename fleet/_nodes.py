"""The nodes of deployment graphs (see :mod:`fleet.dag`): what ``app.method.bind(...)``
and ``InputNode`` build. Plain values; they import nothing of fleet's, so the
user-facing ``Application`` can make them without importing the graph runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet._deployment import Application


class DAGNode:
    """A value each request computes: the input, a part of it, or a method's result."""

    def __getitem__(self, key: Any) -> InputAttributeNode:
        return InputAttributeNode(self, key)


class InputNode(DAGNode):
    """The request's input. Use as a context manager: ``with InputNode() as inp:``."""

    def __enter__(self) -> InputNode:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "InputNode()"


class InputAttributeNode(DAGNode):
    """``node[key]``: one item of the input (or of another node's result)."""

    def __init__(self, parent: DAGNode, key: Any) -> None:
        self.parent = parent
        self.key = key

    def __repr__(self) -> str:
        return f"{self.parent!r}[{self.key!r}]"


class MethodNode(DAGNode):
    """``app.method.bind(*args)``: call method of app's deployment with these arguments."""

    def __init__(self, app: Application, method: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.app = app
        self.method = method
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"{self.app.deployment.name}.{self.method}.bind(...)"


class MethodBinder:
    """``app.method``: ``.bind(...)`` makes a :class:`MethodNode`."""

    def __init__(self, app: Application, method: str) -> None:
        self.app = app
        self.method = method

    def bind(self, *args: Any, **kwargs: Any) -> MethodNode:
        """Call this method with args (nodes among them are computed per request)."""
        return MethodNode(self.app, self.method, args, kwargs)

    def __repr__(self) -> str:
        return f"{self.app.deployment.name}.{self.method}"
