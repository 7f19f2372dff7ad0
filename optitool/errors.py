"""The errors optitool turns into exit codes and one-paragraph messages instead of tracebacks."""

from __future__ import annotations


class OptitoolError(Exception):
    """Base of every error the CLI reports without a traceback; `exit_code` is what the process returns."""

    exit_code = 1


class ConfigError(OptitoolError):
    """The pipeline, a setting or a command-line argument is wrong: nothing was loaded or written."""

    exit_code = 2


class PluginError(OptitoolError):
    """A plugin could not be loaded or registered something it may not (duplicate name, bad API version)."""

    exit_code = 2


class PassError(OptitoolError):
    """A pass could not do its job on this model; raise it from `Pass.run` with a message a user can act on."""

    exit_code = 1


class RunError(OptitoolError):
    """The run failed after it started (a pass, an evaluation or a benchmark raised)."""

    exit_code = 1


class BudgetError(OptitoolError):
    """The run finished but at least one budget in `[budget]` was not met."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI cancel, `timeout`, `docker stop`), handled exactly like Ctrl-C; `signum` is the signal
    a child process is given in turn."""

    signum = 15
