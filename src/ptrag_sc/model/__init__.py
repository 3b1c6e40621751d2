"""User-facing model classes."""

from ._ptrag import PTRAG

__all__ = ["PTRAG"]
