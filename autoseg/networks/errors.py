"""The one error type of :mod:`autoseg.networks`.

A network is built from numbers, so this package imports nothing of autoseg outside itself, not even
``autoseg.errors``. Its user-facing problems (an unknown architecture, an option it does not have, a patch it
cannot take) raise :class:`NetworkError` with a one-line message naming the fix; the stages that build networks
from a plan (planner, trainer, predictor, nnU-Net import) turn it into the ``ConfigurationError`` the command
line prints, with the same text (``autoseg.errors.reraised_as``).
"""
from __future__ import annotations


class NetworkError(ValueError):
    """An architecture, option, topology or patch that the registry refuses; the message names the fix.

    A ``ValueError`` because that is what it is to code that uses the networks on their own."""
