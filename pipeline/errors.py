"""Errors that end a run with one clear sentence and a documented exit code.

Every failure a user can cause or meet (bad input, a capture that cannot be reconstructed, a result
below the quality bar) is a `PipelineError`. The command line prints its message, never a traceback,
and exits with its `exit_code`. Anything else is a bug and exits with `EXIT_INTERNAL`. What each
code means, and what to try next, is in `contract.EXIT_CODES`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # bad command line, config or input file: fix the request and run again
EXIT_RECONSTRUCTION = 3  # the capture could not be reconstructed (too few frames register, no overlap)
EXIT_QUALITY = 4  # training finished but the result failed the quality gate; nothing was exported
EXIT_INTERNAL = 5  # a bug or an environment problem (out of memory, missing library)
EXIT_CANNOT_RUN = 6  # the control plane: no backend could run the job
EXIT_INTERRUPTED = 130


class PipelineError(Exception):
    """A failure with a message meant for the user. `stage` names where it happened."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, stage: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "stage": self.stage,
            "exit_code": self.exit_code,
        }


class InputError(PipelineError):
    """The input media, the config or the command line is not usable as given."""

    exit_code = EXIT_USAGE


class ReconstructionError(PipelineError):
    """Structure from motion could not recover the cameras well enough to train."""

    exit_code = EXIT_RECONSTRUCTION


class QualityError(PipelineError):
    """The trained splat is blank or garbage; it is not exported."""

    exit_code = EXIT_QUALITY


class EnvironmentProblem(PipelineError):
    """The machine lacks something the settings ask for (a GPU, memory, a library)."""

    exit_code = EXIT_INTERNAL


class CannotRun(PipelineError):
    """No backend could run the job (no matching node, a queue timeout, repeated failures, unreachable)."""

    exit_code = EXIT_CANNOT_RUN


def usage_error(message: str, hint: str | None = None) -> InputError:
    """A bad command line or request: exit code 2 with one sentence."""
    return InputError(message, hint=hint)
