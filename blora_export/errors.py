"""The tool's errors. Each carries the process exit code the CLI maps it to.

Every message is one line and says what would work instead, so the CLI can print
``error: <message>`` and exit without a traceback.
"""
from __future__ import annotations


class BloraError(Exception):
    """Base class: bad input or usage (exit code 2)."""

    exit_code = 2


class BadInputError(BloraError):
    """Input files are missing, malformed, truncated, non-finite or inconsistent."""


class UnsupportedError(BloraError):
    """A valid request this tool cannot carry out; the message names what would work."""


class VerificationError(BloraError):
    """The artifact does not compute what the trained adapter computed (exit code 1)."""

    exit_code = 1


def problems_error(subject: str, problems: list[str]) -> BadInputError:
    """One error that reports every problem found at once (mlx-lm style)."""
    if len(problems) == 1:
        return BadInputError(f"{subject}: {problems[0]}")
    head = f"{subject}: {len(problems)} problems: "
    shown = "; ".join(problems[:8])
    more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return BadInputError(head + shown + more)


class OutputError(BloraError):
    """An output that must not or cannot be written: it is (or holds, or lies in) an input, it
    exists without --overwrite, its folder is not writable, or the disk filled up while writing."""
