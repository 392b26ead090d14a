"""User-facing errors: the CLI prints these as one line, without a traceback."""


class MiniEngineError(Exception):
    """A problem the user can fix (bad input, missing file, unavailable backend)."""


class ConfigError(MiniEngineError):
    """A config file, a --set override or a constructor argument is invalid."""


class BackendUnavailable(MiniEngineError):
    """The backend cannot run on this machine; the message says why and what to do."""


class ModelNotFound(MiniEngineError):
    """A model spec does not resolve to weights on this machine."""


class PromptTooLong(MiniEngineError):
    """A prompt does not fit the model's context window."""
