"""Policy-gradient algorithms (built in, or plug-ins from installed packages: see ``base``) and
the losses they share."""

import importlib

from sftrl.algos.base import (
    ALGORITHMS,
    PLUGIN_GROUP,
    PluginError,
    PolicyAlgorithm,
    PolicyContext,
    algorithm_class,
    algorithm_names,
    make_algorithm,
    register,
)

# One line per algorithm module: importing it registers the algorithm.
_PLUGIN_MODULES = ("sftrl.algos.sft_pg", "sftrl.algos.sft_pg_kl", "sftrl.algos.ppo", "sftrl.algos.sft")
for _module in _PLUGIN_MODULES:
    importlib.import_module(_module)

__all__ = [
    "ALGORITHMS",
    "PLUGIN_GROUP",
    "PluginError",
    "PolicyAlgorithm",
    "PolicyContext",
    "algorithm_class",
    "algorithm_names",
    "make_algorithm",
    "register",
]
