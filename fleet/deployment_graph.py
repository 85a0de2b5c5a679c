"""Graph building under the module path Ray Serve code imports it from.

``from ray.serve.deployment_graph import InputNode`` becomes ``from
fleet.deployment_graph import InputNode``; the names are :mod:`fleet.dag`'s.
"""

from fleet.dag import DAGNode, InputAttributeNode, InputNode

__all__ = ["DAGNode", "InputAttributeNode", "InputNode"]
