"""Typed errors. Every user-facing failure is one of these, with a message that says
what is wrong and what to do about it."""


class QuantVLAError(Exception):
    """Base class of every error this library raises on purpose."""


class QuantInputError(QuantVLAError, ValueError):
    """A tensor or setting handed to the quantizer is unusable (wrong dtype or shape,
    bits out of range, NaN/Inf values, empty tensors)."""


class KernelUnavailable(QuantVLAError, RuntimeError):
    """The requested integer GEMM backend cannot run here."""
