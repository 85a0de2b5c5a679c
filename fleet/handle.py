"""Handle classes under the module path Ray Serve code imports them from.

``from ray.serve.handle import RayServeDeploymentHandle`` becomes ``from fleet.handle
import RayServeDeploymentHandle``: every name here is :class:`fleet.DeploymentHandle`
or one of its response types.
"""

from fleet._handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

#: Ray Serve 2.x's name for the handle a deployment receives (``fleet.DeploymentHandle``).
RayServeDeploymentHandle = DeploymentHandle
#: Ray Serve 2.x's async handle (``fleet.DeploymentHandle``: await its responses).
RayServeHandle = DeploymentHandle
#: Ray Serve 2.x's sync handle (``fleet.DeploymentHandle``: ``response.result()``).
RayServeSyncHandle = DeploymentHandle

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
           "RayServeDeploymentHandle", "RayServeHandle", "RayServeSyncHandle"]
