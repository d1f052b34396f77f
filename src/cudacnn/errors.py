"""User-facing errors: one clear message naming the problem and the fix; the CLI exits non-zero."""


class CudacnnError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class DataError(CudacnnError):
    """A data source is missing, corrupt or not in a layout we understand."""


class ConfigError(CudacnnError):
    """A flag, preset or config file value is invalid."""


class CheckpointError(CudacnnError):
    """A checkpoint is missing, corrupt, or belongs to another model."""
