"""One virtual environment per peer library, outside the project's, for `bench peers`.

The peers pin old numpy/pandas/torch versions that must not leak into the project's environment, and
none of them is a dependency of llmrec_dist. Each environment is made once under
``<work>/<package>-<version>`` and reused while it still imports the peer and torch at the pinned versions.
torch is always installed first, at :data:`TORCH_PIN`, and every later install is constrained to it: a
peer that asks for another torch fails to install (a result row), it never swaps the project's torch build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
MARKER = "llmrec-peer-env.json"
INSTALL_TIMEOUT_S = 3600


@dataclass(frozen=True)
class PeerEnv:
    """A peer library's environment: what pip installs after torch, and what to report the versions of."""

    package: str  # distribution name, e.g. "recbole"
    version: str
    requirements: tuple[str, ...]  # pip requirement strings (the peer pinned, plus its venv's own pins)
    import_name: str
    report: tuple[str, ...] = field(default=("torch", "numpy", "pandas", "scipy"))

    @property
    def name(self) -> str:
        return f"{self.package}-{self.version}"


class PeerSetupError(RuntimeError):
    """The environment could not be made or does not work; the message says what and names the log."""


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def _run(cmd: list[str], log: Path, timeout: float = INSTALL_TIMEOUT_S) -> None:
    """Run ``cmd``, appending its output to ``log``; raise PeerSetupError when it fails."""
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise PeerSetupError(f"`{' '.join(cmd[:4])} ...` ran past {timeout:.0f} s (log: {log})") from None
        except OSError as err:
            raise PeerSetupError(f"`{cmd[0]}` could not run: {err} (log: {log})") from None
    if rc != 0:
        raise PeerSetupError(f"`{' '.join(cmd)}` exited {rc}: {last_error_line(log)} (log: {log})")


def last_error_line(log: Path) -> str:
    """The last error-looking line of a log, to say in one line why a step failed."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:300]


# Run by the environment's python: import the peer, print the versions of the named distributions.
_PROBE = """
import importlib, json, sys
from importlib import metadata
importlib.import_module(sys.argv[1])
versions = {}
for name in sys.argv[2:]:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps(versions))
"""


def installed_versions(python: Path, env: PeerEnv, log: Path) -> dict:
    """``{distribution: version}`` of the peer and the packages it reports, as the venv's python sees them
    (it imports the peer too, so a broken install is found here)."""
    cmd = [str(python), "-c", _PROBE, env.import_name, env.package, *env.report]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise PeerSetupError(f"{env.name}: `import {env.import_name}` ran past 600 s in {python}") from None
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {python} -c <import {env.import_name}, print versions>\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise PeerSetupError(f"{env.name}: `import {env.import_name}` failed in {python}: "
                             f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:300]} (log: {log})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _working(folder: Path, env: PeerEnv, log: Path) -> dict | None:
    """The recorded versions of an existing environment that still imports its peer at the pinned
    versions, or None (then it is made again)."""
    marker = folder / MARKER
    if not marker.is_file() or not venv_python(folder).exists():
        return None
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if recorded.get("requirements") != list(env.requirements):
        return None
    try:
        versions = installed_versions(venv_python(folder), env, log)
    except (PeerSetupError, OSError, ValueError):
        return None
    if versions.get("torch", "").split("+")[0] != TORCH_PIN.split("==")[1] or versions.get(env.package) != env.version:
        return None
    return versions


def ensure_env(env: PeerEnv, work: Path, log_dir: Path, base_python: str = sys.executable) -> tuple[Path, dict, bool]:
    """The peer's environment under ``work``, made if needed: ``(python, versions, reused)``.

    Raises PeerSetupError when it cannot be made (creating the venv, installing torch or the peer,
    or importing the peer fails); the log of every step is ``<log_dir>/<name>-install.log``."""
    folder = Path(work) / env.name
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{env.name}-install.log"
    log.write_text("", encoding="utf-8")
    versions = _working(folder, env, log)
    if versions is not None:
        return venv_python(folder), versions, True
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _run([base_python, "-m", "venv", str(folder)], log)
    python = str(venv_python(folder))
    # torch first, at the pin, then the peer constrained to it: no peer replaces torch
    _run([python, "-m", "pip", "install", TORCH_PIN], log)
    constraints = folder / "torch-constraint.txt"
    constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
    _run([python, "-m", "pip", "install", "-c", str(constraints), *env.requirements], log)
    versions = installed_versions(Path(python), env, log)
    (folder / MARKER).write_text(json.dumps({"requirements": list(env.requirements), "versions": versions},
                                            indent=2) + "\n", encoding="utf-8")
    return Path(python), versions, False
