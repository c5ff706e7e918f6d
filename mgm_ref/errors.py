"""Error types: every bad input surfaces as one of these with a message that says what to fix."""


class MGMError(ValueError):
    """Base class for errors caused by the user's input (checkpoint, image, prompt, option)."""


class CheckpointError(MGMError):
    """A checkpoint folder is missing files, keys or has an unsupported config."""


class ImageError(MGMError):
    """An image cannot be decoded or is out of bounds."""


class PromptError(MGMError):
    """A prompt does not fit the images given or the model's context."""
