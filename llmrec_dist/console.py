"""What a command prints, and where everything else goes.

:func:`llmrec_dist.cli.main` opens one session per command (:func:`start`, :func:`close`)::

    stdout     our own lines: progress, one line per epoch, results (:func:`say`)
    stderr     llmrec_dist's warnings and errors, one line each; a failure's one line (:func:`failure_line`)
    log file   everything: our lines, every logger at INFO (DEBUG with -v), Python warnings, Ray's and
               MLflow's driver-side loggers, a failure's traceback

With ``-v`` every log record is shown on stderr as well, as before this module existed, and Ray
forwards its workers' output to the driver (:func:`llmrec_dist.ray_setup.init_ray`). Without a session
(the library used from Python, the tests) nothing here touches logging and :func:`say` just prints.

Ray and MLflow give their loggers their own console handlers and stop them propagating to the root
logger, so a root handler alone never sees their records. MLflow's setup is switched off through its
documented ``MLFLOW_CONFIGURE_LOGGING``; Ray's is undone by :func:`quiet_libraries`, called where
Ray has just been imported (``init_ray``, before a ``fit()``) and before a model is registered.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR_ENV = "LLMREC_LOG_DIR"
DEFAULT_LOG_DIR = "llmrec_logs"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGER = "llmrec_dist"
SAID = logging.getLogger("llmrec_dist.console")  # our console lines, copied into the log file

# Library settings for a quiet console, each read by the library itself (set unless the user did).
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars on stderr
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",              # transformers' "Writing model shards" bars
}
# MLflow attaches a stderr handler to its loggers when imported unless told not to; then its records
# reach the root logger (file, and console with -v). The levels it would have set are set here instead.
# (Ray workers get it back on: llmrec_dist.ray_setup.worker_env.)
MLFLOW_ENV = {"MLFLOW_CONFIGURE_LOGGING": "false"}
QUIET_LEVELS = {"sqlalchemy.engine": logging.WARNING, "alembic": logging.WARNING, "huey": logging.WARNING}


@dataclass
class Session:
    """One command's logging: its log file and what to undo when it ends."""
    name: str
    path: Path
    verbose: bool
    used_ray: bool = False  # set by llmrec_dist.ray_setup.init_ray
    _undo: list = field(default_factory=list)


_session: Session | None = None


def active() -> Session | None:
    return _session


def verbose() -> bool:
    """-v given, or no session (the library keeps the libraries' own output)."""
    return _session is None or _session.verbose


def log_path() -> Path | None:
    return _session.path if _session else None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def default_log_file(name: str, log_dir: str | os.PathLike | None = None) -> Path:
    """``<log_dir or $LLMREC_LOG_DIR or ./llmrec_logs>/<name>-<YYYYmmdd-HHMMSS>.log``."""
    folder = Path(log_dir or os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)
    return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest's capture, a redirect)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _OwnWarnings(logging.Filter):
    """The quiet console: llmrec_dist's warnings and errors only (never a library's record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING and record.name.startswith(OWN_LOGGER + ".")
                and record.name != SAID.name and not getattr(record, "file_only", False))


class _NotSaid(logging.Filter):
    """-v: everything but the lines :func:`say` already printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != SAID.name and not getattr(record, "file_only", False)


class _OneLine(logging.Formatter):
    """``warning: message`` with no traceback (the log file has it)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def start(name: str, verbose: bool = False, path: str | os.PathLike | None = None) -> Session:
    """Route this process's logging for one command named ``name``; returns the session (its log file).
    Undone by :func:`close`."""
    global _session
    if _session is not None:
        close()
    path = Path(path) if path else default_log_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    session = Session(name, path, verbose)
    root = logging.getLogger()

    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    console = _Stderr()
    if verbose:
        console.setFormatter(logging.Formatter(FILE_FORMAT))
        console.addFilter(_NotSaid())
    else:
        console.setFormatter(_OneLine())
        console.addFilter(_OwnWarnings())
    old_level = root.level
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    session._undo.append(lambda: (root.removeHandler(file_handler), root.removeHandler(console),
                                  file_handler.close(), root.setLevel(old_level)))

    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger → the file
    session._undo.append(lambda: logging.captureWarnings(False))

    env = {**(QUIET_ENV if not verbose else {}), **{k: v for k, v in os.environ.items() if k in QUIET_ENV},
           **MLFLOW_ENV}  # the user's progress-bar settings win; MLflow's own set-up is always off here
    for key, value in env.items():
        old = os.environ.get(key)
        os.environ[key] = value
        session._undo.append(lambda key=key, old=old: os.environ.pop(key, None) if old is None
                             else os.environ.__setitem__(key, old))
    for logger_name, level in QUIET_LEVELS.items():
        logger = logging.getLogger(logger_name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
            session._undo.append(lambda logger=logger: logger.setLevel(logging.NOTSET))

    _session = session
    quiet_libraries()  # those imported already (in-process callers, the tests)
    return session


def close() -> None:
    """Undo :func:`start`: handlers, levels, environment and rerouted loggers as they were."""
    global _session
    session, _session = _session, None
    if session is None:
        return
    for undo in reversed(session._undo):
        undo()


def quiet_libraries() -> None:
    """Send the libraries' own console output to the log file: every logger that prints on its own (a
    console handler and ``propagate = False``: Ray's, Ray Data's, Ray Train's, MLflow's when imported
    before :func:`start`) now propagates to the root logger (the log file, and the console with -v);
    file handlers stay. Without -v, MLflow's event prints ("Successfully registered model ...") are
    switched off too; some MLflow calls (logging a model) switch them back on, so call this again
    after them. Cheap and idempotent; a no-op without a session. Call it after importing such a library."""
    if _session is None:
        return
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.startswith(OWN_LOGGER) or logger.propagate:
            continue
        stream_handlers = [h for h in logger.handlers
                           if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        if not stream_handlers:
            continue
        for handler in stream_handlers:
            logger.removeHandler(handler)
        logger.propagate = True
        _session._undo.append(lambda logger=logger, handlers=stream_handlers: (
            [logger.addHandler(h) for h in handlers], setattr(logger, "propagate", False)))
    if not _session.verbose and "mlflow" in sys.modules:
        _quiet_mlflow_prints()


def _quiet_mlflow_prints() -> None:
    """MLflow prints a few lines with ``print`` ("Successfully registered model ...") through a stream
    of its own; its switch turns them off (our own lines say the same)."""
    try:
        from mlflow.utils import logging_utils
    except ImportError:
        return
    if logging_utils.MLFLOW_LOGGING_STREAM.enabled:
        logging_utils.disable_logging()
        _session._undo.append(logging_utils.enable_logging)


def say(text: str = "", err: bool = False) -> None:
    """Print one of our own lines (stdout, or stderr with ``err``) and copy it into the log file."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
    if _session is not None:
        SAID.info("%s", text)


def say_err(text: str = "") -> None:
    """:func:`say` on stderr: progress beside a machine-readable stdout (``--json``)."""
    say(text, err=True)


# ------------------------------------------------------------------------------------------ failures
def one_line_cause(exc: BaseException) -> str:
    """``Type: message`` of the error at the bottom of ``exc``: through Ray Train's worker and
    controller failures, Ray's task errors and ``raise ... from``; a message that carries a traceback
    (as Ray's do) is cut to its last line."""
    where = ""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            where, nxt = f" (worker rank {rank})", failures[rank]
        elif isinstance(getattr(exc, "controller_failure", None), BaseException):  # ray.train.ControllerError
            nxt = exc.controller_failure
        elif isinstance(getattr(exc, "cause", None), BaseException):  # ray.exceptions.RayTaskError
            nxt = exc.cause
        elif exc.__cause__ is not None:
            nxt = exc.__cause__
        else:
            break
        exc = nxt
    name = type(exc).__name__
    if "(" in name:  # RayTaskError(ValueError): the user's type
        name = name.split("(")[-1].rstrip(")")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith(("Traceback", "File ")) for line in lines):
        message = lines[-1]
        if message.startswith(name + ":"):
            message = message[len(name) + 1:].strip()
    else:
        message = " ".join(lines)
    text = f"{name}: {message}" if message else name
    return (text if len(text) <= 300 else text[:297] + "...") + where


def failure_line(verb: str, exc: BaseException) -> str:
    """``llmrec-dist VERB: failed: <cause>; full log: <path>`` (the traceback goes to the log file)."""
    line = f"llmrec-dist {verb}: failed: {one_line_cause(exc)}"
    return f"{line}; full log: {shown_path(_session.path)}" if _session else line


def log_failure(exc: BaseException) -> None:
    """The full traceback into the log file only (on the console too with -v)."""
    logging.getLogger("llmrec_dist.cli").error("the command failed", exc_info=exc,
                                                extra={"file_only": not verbose()})
