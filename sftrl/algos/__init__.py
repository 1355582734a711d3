"""Policy-gradient algorithms (plug-ins by name) and the losses they share."""

import importlib

from sftrl.algos.base import ALGORITHMS, PolicyAlgorithm, PolicyContext, make_algorithm, register

# One line per algorithm module: importing it registers the algorithm.
_PLUGIN_MODULES = ("sftrl.algos.sft_pg", "sftrl.algos.ppo", "sftrl.algos.sft")
for _module in _PLUGIN_MODULES:
    importlib.import_module(_module)

__all__ = ["ALGORITHMS", "PolicyAlgorithm", "PolicyContext", "make_algorithm", "register"]
