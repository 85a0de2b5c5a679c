"""Deployment graphs: ``InputNode`` and method binding.

Inside ``with InputNode() as inp:``, ``app.method.bind(inp)`` says what each request
runs: call ``method`` of the deployment ``app`` with the request's input. Nodes chain
(``b.f.bind(a.g.bind(inp))``) and pick parts of the input (``inp["key"]``, ``inp[0]``).
A driver (:class:`fleet.drivers.DefaultgRPCDriver`, :class:`fleet.drivers.DAGDriver`)
bound to a node is an application like any other::

    with InputNode() as inp:
        market = FruitMarket.bind(OrangeStand.bind(), AppleStand.bind())
        app = DefaultgRPCDriver.bind(market.check_price.bind(inp))
    fleet.run(app)

Deployments in a graph receive handles that follow the graph API's two-step protocol:
``ref = await handle.remote(x)`` gives a reference and ``await ref`` its value.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fleet._deployment import Application
from fleet._nodes import DAGNode, InputAttributeNode, InputNode, MethodBinder, MethodNode

_MARK = "__fleet_dag__"


# -- graphs as plain values, for the driver replica ---------------------------------

def encode(node: Any, ids: dict[int, int] | None = None) -> Any:
    """The graph as dicts, lists and Applications (which ``build_plans`` turns into
    handles); each Application met is marked to get two-step handles. Method nodes are
    numbered within this graph (ids), so a node bound twice runs once per request."""
    if ids is None:
        ids = {}
    if isinstance(node, InputNode):
        return {_MARK: "input"}
    if isinstance(node, InputAttributeNode):
        return {_MARK: "item", "of": encode(node.parent, ids), "key": node.key}
    if isinstance(node, MethodNode):
        _mark_graph(node.app)
        return {_MARK: "call", "id": ids.setdefault(id(node), len(ids) + 1),
                "target": node.app, "method": node.method,
                "args": [encode(a, ids) for a in node.args],
                "kwargs": {k: encode(v, ids) for k, v in node.kwargs.items()}}
    if isinstance(node, Application):
        _mark_graph(node)
        return node
    if isinstance(node, list | tuple):
        return {_MARK: "list", "tuple": isinstance(node, tuple),
                "items": [encode(v, ids) for v in node]}
    if isinstance(node, dict):
        return {_MARK: "dict", "items": {k: encode(v, ids) for k, v in node.items()}}
    return node


def _mark_graph(app: Application) -> None:
    if app._legacy_refs:
        return
    app._legacy_refs = True
    for value in (*app.args, *app.kwargs.values()):
        for inner in _applications(value):
            _mark_graph(inner)


def _applications(value: Any) -> list[Application]:
    if isinstance(value, Application):
        return [value]
    if isinstance(value, list | tuple):
        return [a for v in value for a in _applications(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _applications(v)]
    return []


class _Node:
    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        raise NotImplementedError


class _Const(_Node):
    def __init__(self, value: Any) -> None:
        self.value = value

    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        return self.value


class _Input(_Node):
    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        return value


class _Item(_Node):
    def __init__(self, of: _Node, key: Any) -> None:
        self.of = of
        self.key = key

    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        return (await self.of.run(value, memo))[self.key]


class _Seq(_Node):
    def __init__(self, items: list[_Node], as_tuple: bool) -> None:
        self.items = items
        self.as_tuple = as_tuple

    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        out = await _all(self.items, value, memo)
        return tuple(out) if self.as_tuple else out


class _Map(_Node):
    def __init__(self, items: dict[Any, _Node]) -> None:
        self.items = items

    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        values = await _all(list(self.items.values()), value, memo)
        return dict(zip(self.items, values, strict=True))


class _Call(_Node):
    def __init__(self, node_id: int, handle: Any, args: list[_Node],
                 kwargs: dict[str, _Node]) -> None:
        self.id = node_id
        self.handle = handle
        self.args = args
        self.kwargs = kwargs
        self.plain = not kwargs and all(isinstance(a, _Input) for a in args)

    async def run(self, value: Any, memo: dict[int, Any]) -> Any:
        task = memo.get(self.id)
        if task is None:    # a node used twice runs once per request
            task = asyncio.ensure_future(self._run(value, memo))
            memo[self.id] = task
        return await task

    async def _run(self, value: Any, memo: dict[int, Any]) -> Any:
        args = await _all(self.args, value, memo)
        kw = dict(zip(self.kwargs, await _all(list(self.kwargs.values()), value, memo),
                      strict=True))
        return await self.handle.remote(*args, **kw)


async def _all(nodes: list[_Node], value: Any, memo: dict[int, Any]) -> list[Any]:
    if len(nodes) <= 1 or sum(not isinstance(n, _Const | _Input) for n in nodes) <= 1:
        return [await n.run(value, memo) for n in nodes]
    return list(await asyncio.gather(*[n.run(value, memo) for n in nodes]))


def compile_graph(plan: Any) -> _Node:
    """The runnable form of an encoded graph (handles in place of Applications)."""
    from fleet._handle import DeploymentHandle
    if isinstance(plan, DeploymentHandle):    # a driver bound to a deployment: call it
        return _Call(0, plan, [_Input()], {})
    if not isinstance(plan, dict) or _MARK not in plan:
        return _Const(plan)
    kind = plan[_MARK]
    if kind == "input":
        return _Input()
    if kind == "item":
        return _Item(compile_graph(plan["of"]), plan["key"])
    if kind == "list":
        return _Seq([_value(v) for v in plan["items"]], plan["tuple"])
    if kind == "dict":
        return _Map({k: _value(v) for k, v in plan["items"].items()})
    handle = plan["target"].options(method_name=plan["method"])
    return _Call(plan["id"], handle, [_value(a) for a in plan["args"]],
                 {k: _value(v) for k, v in plan["kwargs"].items()})


def _value(plan: Any) -> _Node:
    """An argument: handles stay handles; only the graph's own markers are computed."""
    from fleet._handle import DeploymentHandle
    if isinstance(plan, DeploymentHandle):
        return _Const(plan)
    return compile_graph(plan)


class Graph:
    """A compiled graph: ``await graph.run(input)`` computes the bound node."""

    def __init__(self, plan: Any) -> None:
        self.root = compile_graph(plan)

    async def run(self, value: Any) -> Any:
        root = self.root
        if isinstance(root, _Call) and root.plain:   # the common case: method(input)
            return await root.handle.remote(*[value for _ in root.args])
        return await root.run(value, {})


__all__ = ["DAGNode", "Graph", "InputAttributeNode", "InputNode", "MethodBinder", "MethodNode",
           "compile_graph", "encode"]
