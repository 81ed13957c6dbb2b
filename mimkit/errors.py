"""User-facing errors.

Every problem a user can fix (bad path, config key, image, checkpoint) is raised as a
:class:`MimkitError` whose message is one sentence naming the problem and the fix. The CLI
prints it without a traceback and exits with status 2.
"""


class MimkitError(Exception):
    """Base class for errors the user can fix; the message says how."""


class ConfigError(MimkitError, ValueError):
    """An invalid configuration key, value or combination."""


class CheckpointError(MimkitError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class TrainingError(MimkitError, RuntimeError):
    """Training cannot continue (for example, the loss became NaN)."""


class DataError(MimkitError, ValueError):
    """A data problem (path, file, image, split) the user can fix."""


class MissingSplitError(DataError):
    """The data has no such split (as opposed to a split it cannot read); optional splits catch it."""
