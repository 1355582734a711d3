"""``python -m sftrl``: the ``sftrl`` command (``sftrl.cli``) where its console script is not on
PATH, e.g. ``python -m sftrl run configs/smoke.yaml`` or ``python -m sftrl schedule fastdpm 10``.

With no arguments it prints the command's help. A config given without a command
(``python -m sftrl configs/x.yaml``) gets a one-line hint naming ``run``, exit code 2.
"""

from __future__ import annotations

import shlex
import sys

from sftrl.cli import build_parser, main
from sftrl.errors import EXIT_USER_ERROR

CONFIG_SUFFIXES = (".yaml", ".yml")


def module_main(argv: list[str]) -> int:
    """``sftrl.cli.main(argv)``, but help for no arguments and a hint for a bare config."""
    if not argv:
        build_parser().print_help()
        return 0
    if argv[0].endswith(CONFIG_SUFFIXES):
        print(f"error: sftrl: '{argv[0]}' is a config, not a command; to fine-tune from it: "
              f"python -m sftrl run {shlex.join(argv)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return main(argv)


if __name__ == "__main__":
    sys.exit(module_main(sys.argv[1:]))
