"""Fresh MLflow SQLite databases for tests, copied from one migrated once per test process.

Creating an MLflow database runs all of its schema migrations: seconds each time, for every test that
tracks to a new ``sqlite:///`` file. A copy of an already migrated, empty database is the same database
to MLflow (the schema is current, the default experiment exists), and costs a file copy.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

_TEMPLATE: Path | None = None


def _template() -> Path:
    global _TEMPLATE
    if _TEMPLATE is None or not _TEMPLATE.exists():
        from mlflow.tracking import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="llmrec-mlflow-template-")) / "mlflow.db"
        quiet = [logging.getLogger(name) for name in ("mlflow", "alembic")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:  # the migrations' INFO lines would land in the output a test captures
            logger.setLevel(logging.WARNING)
        try:
            MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables, runs the migrations
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        _TEMPLATE = path
    return _TEMPLATE


def sqlite_uri(path: Path) -> str:
    """``sqlite:///<path>``; a missing ``path`` starts as a copy of the migrated empty database."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"
