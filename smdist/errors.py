"""Errors raised by smdist's own stages.

Each carries a stable ``category`` (the first word of ``/opt/ml/output/failure``)
and the exit code the agent leaves with, so a failure is data, not a log line.
"""

from __future__ import annotations

from smdist.contract import Category


class SmdistError(Exception):
    """Base of every error smdist raises itself (never a user's error)."""

    category = Category.SMDIST_ERROR
    exit_code = 1
    where: str | None = None
    """Where it happened, for the failure file; None: this host. "" when the message says."""

    def headline(self) -> str:
        """One line for the log and the first line of the failure file."""
        return f"{self.category}: {self}"


class ConfigError(SmdistError):
    """A file under /opt/ml/input/config, a flag or a variable is malformed."""

    category = Category.CONFIG_ERROR
    exit_code = 2


class EntryPointNotFound(SmdistError):
    """The training script or program to run does not exist."""

    category = Category.ENTRY_POINT_NOT_FOUND
    exit_code = 2


class HostResolutionFailed(SmdistError):
    """A host of the job never resolved before the deadline."""

    category = Category.HOST_RESOLUTION_FAILED


class RendezvousFailed(SmdistError):
    """The agents could not meet: port in use, master unreachable, a host never joined."""

    category = Category.RENDEZVOUS_FAILED


class HostLost(SmdistError):
    """A host of the job stopped responding (its container was killed, or its agent died)."""

    category = Category.HOST_LOST
    where = ""


class JobAborted(SmdistError):
    """The job's root cause was found on another host: its headline, as that host wrote it."""

    where = ""

    def __init__(self, headline: str, exit_code: int = 1) -> None:
        category, sep, message = headline.partition(": ")
        super().__init__(message if sep else headline)
        self.category = category if sep and " " not in category else Category.JOB_ABORTED
        self.exit_code = exit_code


class CodeDownloadFailed(SmdistError):
    """``sagemaker_submit_directory`` could not be fetched or safely extracted."""

    category = Category.CODE_DOWNLOAD_FAILED


class DependencyInstallFailed(SmdistError):
    """pip could not install the code dir's requirements.txt (or the package itself)."""

    category = Category.DEPENDENCY_INSTALL_FAILED
