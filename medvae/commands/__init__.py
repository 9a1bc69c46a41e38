"""CLI sub-commands.

Each module here defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules must stay cheap to import (no torch, monai, mlflow at module level) so that
``medvae --help`` answers quickly; heavy imports go inside ``run``.
"""

#: sub-command name -> module under ``medvae.commands``; the order is the order in ``--help``.
COMMANDS = {
    "info": "info",
    "samples": "samples",
    "corrupt": "corrupt",
    "prepare": "prepare",
    "train": "train",
    "restore": "restore",
    "evaluate": "evaluate",
    "review": "review",
    "track": "track",
    "demo": "demo",
}
