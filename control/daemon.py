"""The background supervisor process started by `llmctl start`.

It receives the already-validated config as JSON from the CLI (parsed once), owns
its event loop, signal handlers and logging: ``run_dir/logs/supervisor.log``,
rotated; its raw stdout/stderr (a crash's traceback) go to ``supervisor.out``.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from llmctl.common.config import Config
from llmctl.common.procs import CONFIG_JSON_ENV
from llmctl.control.supervisor import main as supervisor_main


def main() -> int:
    cfg = Config.from_json(os.environ.pop(CONFIG_JSON_ENV))
    handler = logging.handlers.RotatingFileHandler(
        cfg.log_dir / "supervisor.log", maxBytes=cfg.control.log_max_bytes,
        backupCount=cfg.control.log_backups)
    logging.basicConfig(level=logging.INFO, handlers=[handler],
                        format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s")
    return supervisor_main(cfg)


if __name__ == "__main__":
    sys.exit(main())
