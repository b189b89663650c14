"""Start-up checks of what a valid config points at: files and directories.

Parsing (:mod:`agent.config`) says whether the config is well formed; this says whether it
can run here: the state directory is a writable directory, every replay file is a
readable UTF-8 CSV with a header. Each problem is a :class:`ConfigError` naming the key
to change and the path, raised before anything is opened, so ``--check-config`` reports
it and ``agent``/``run`` refuse to start with one line instead of a traceback from SQLite
or from inside a running stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import AgentConfig, ReplaySource
from agent.sources.replay import read_header
from pymigrate.errors import ConfigError

__all__ = ["check_paths", "check_writable_dir"]


def check_writable_dir(path: str | Path, *, key: str) -> None:
    """``path`` is a writable directory, or can be created as one (nothing is created)."""
    p = Path(path)
    shown = p if p.is_absolute() else f"{p} (relative to {Path.cwd()})"
    probe = p
    while not probe.exists():  # the nearest existing ancestor decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == p else f"is under {probe}, which is"
        raise ConfigError(key, f"{shown} {what} a file, not a directory; "
                          "point it at a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "is not writable" if probe == p else f"cannot be created ({probe} is not writable)"
        raise ConfigError(key, f"{shown} {why} by this user (uid {os.getuid()}); "
                          "choose a writable directory or fix its permissions")


def _check_state_file(path: Path, *, key: str) -> None:
    if path.exists():
        if not path.is_file():
            raise ConfigError(key, f"{path} exists and is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(key, f"{path} is not readable and writable by this user")
    check_writable_dir(path.parent, key=key)


def check_paths(cfg: AgentConfig) -> None:
    """Raise ConfigError for the first path in ``cfg`` that cannot work."""
    check_writable_dir(cfg.device.data_dir, key="device.data_dir")
    _check_state_file(cfg.data_path(cfg.buffer.path), key="buffer.path")
    for i, s in enumerate(cfg.sources):
        if isinstance(s, ReplaySource):
            read_header(s.path, key=f"sources[{i}].path")
