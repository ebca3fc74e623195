"""The one exception type users see.

Anything raised as ``MegavodError`` is a problem with the user's input (a file, a config value, a
checkpoint); the CLI prints its message as one line and exits non-zero, without a traceback. Bugs in
megavod itself stay ordinary exceptions so that they keep their traceback.
"""

from __future__ import annotations


class MegavodError(Exception):
    """A user-facing error with a one-line message naming the problem."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class StreamError(MegavodError):
    """A ``MegavodError`` raised while reading one of several streams run together
    (:meth:`megavod.Detector.stream_many`); ``stream`` is that stream's position among them."""

    def __init__(self, stream: int, error: MegavodError) -> None:
        super().__init__(str(error), error.exit_code)
        self.stream = stream


class ConfigError(MegavodError):
    """A bad config key, type or value (exit code 2, like argparse)."""

    exit_code = 2


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an error's message (else its type's name), for one-line messages
    about a file whose content made a parser or library fail."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
