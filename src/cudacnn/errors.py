"""User-facing errors: one clear message naming the problem and the fix; the CLI exits non-zero."""


class CudacnnError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class DataError(CudacnnError):
    """A data source is missing, corrupt or not in a layout we understand."""


class ConfigError(CudacnnError):
    """A flag, preset or config file value is invalid."""


class CheckpointError(CudacnnError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class DiskFullError(CudacnnError):
    """The disk (or quota) filled up while writing `path`; the previous version of the file is intact.
    `fix` is what the user does next; the trainer swaps in a resume command."""

    def __init__(self, path, fix: str = "free space and run the command again"):
        self.path, self.fix = path, fix
        super().__init__(f"no space left on device writing {path}; {fix}")
