"""The Ray edge: the only package that imports Ray.

Each component is a plain object built by a factory from ``sftrl.components`` *inside* its actor
(``ComponentActor``), so data and networks are created where they are used. A ``RayHandle`` gives
the trainer the same ``call``/``resolve`` interface as a local object; its futures are object
references that flow from one actor to the next without passing through the driver.
"""

from sftrl.distributed.system import RayHandle, RaySystemLaunch, build_ray_system, init_ray

__all__ = ["RayHandle", "RaySystemLaunch", "build_ray_system", "init_ray"]
