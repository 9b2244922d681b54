"""Exception types raised by slimtune.

Every message names the field or module at fault, the value received and what is allowed, so the
caller can fix the input without reading slimtune's source.
"""


class SlimtuneError(Exception):
    """Base class of every error slimtune raises on purpose."""


class ConfigError(SlimtuneError, ValueError):
    """A configuration field has a value that is not allowed (raised in ``__post_init__``)."""


class ShapeError(SlimtuneError, ValueError):
    """A tensor or layer has a shape the method cannot work with (e.g. ``r`` does not divide ``d_in``)."""


class TargetModulesError(SlimtuneError, ValueError):
    """``target_modules`` matched nothing, or matched a module the method cannot adapt."""


class DeviceError(SlimtuneError, RuntimeError):
    """An adapter's parameters are on another device than the input of its layer (move the whole model instead)."""


class AdapterNameError(SlimtuneError, KeyError):
    """An adapter name that does not exist on the model, or that already exists when adding one."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterFileError(SlimtuneError, ValueError):
    """A saved adapter is missing, damaged, from another model, or from an incompatible slimtune version."""


class MergeError(SlimtuneError, RuntimeError):
    """A merge or unmerge that cannot be done exactly in the layer's current state."""


class DataError(SlimtuneError, ValueError):
    """A data file or data set is empty or malformed (the message names the path and line, or the row)."""
