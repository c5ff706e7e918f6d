"""Error types: every bad input surfaces as one of these with a message that says what to fix."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class MGMError(ValueError):
    """Base class for errors caused by the user's input (checkpoint, image, prompt, option)."""


class CheckpointError(MGMError):
    """A checkpoint folder is missing files, keys or has an unsupported config."""


class ImageError(MGMError):
    """An image cannot be decoded or is out of bounds."""


class PromptError(MGMError):
    """A prompt does not fit the images given or the model's context."""


def run_cli(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command-line tool's body and return its exit status.

    An MGMError is the user's to fix: one line `PROG: error: MESSAGE` on stderr and status 2 (with the
    traceback too when `debug`). Anything else is a bug and propagates with its traceback.
    """
    try:
        return body() or 0
    except MGMError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
