"""Exceptions for problems the user can fix.

Every error that stems from bad input derives from :class:`AvssError`. The command line turns these into a
one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AvssError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ModelNotFoundError(AvssError):
    """The model path, embedded short name or hub id could not be resolved."""


class WeightsError(AvssError):
    """A model's weight files exist but cannot be read (a truncated or corrupt safetensors file)."""


class ModelAssemblyError(AvssError):
    """An embedded model's split parts do not assemble into the recorded file (size, magic or sha256)."""


class GgufError(AvssError):
    """A GGUF file is unreadable (truncated, not GGUF) or cannot be pruned as asked."""


class UnsupportedArchitectureError(AvssError):
    """The model's architecture has no entry in the adapter table."""


class DataError(AvssError):
    """Calibration or evaluation data is missing, empty or malformed."""


class PruneConfigError(AvssError):
    """The requested pruning is impossible (bad fraction, removes every layer, ...)."""


class OutputError(AvssError):
    """An output location exists, is not writable, or writing to it failed."""


class NonFiniteActivationError(AvssError):
    """A layer produced NaN or Inf activations, so its statistics would be meaningless."""


class DeviceError(AvssError):
    """The requested device or dtype is not available on this machine."""


class OptionError(AvssError):
    """An option has a value outside its allowed set (unknown site, variance kind, malformed threshold)."""


class CheckpointError(AvssError):
    """A checkpoint to resume from is unreadable or was written by a different run."""


class HealConfigError(AvssError):
    """The requested healing or fine-tuning is impossible (unknown method, no pruning record, no targets)."""


class DolaConfigError(AvssError):
    """A DoLa option is outside its allowed set."""


class MitigationConfigError(AvssError):
    """The requested layers or mitigation options are impossible."""


class HubUnavailableError(DataError):
    """The hub dataset could not be read; the message says why (offline, not installed, load failure)."""


class PairingError(DataError):
    """Two results cannot be compared example by example (different or repeated example ids)."""
