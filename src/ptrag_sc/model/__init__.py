"""User-facing model classes."""

from ._io import ModelFileError, SafeSaveMixin
from ._ptrag import PTRAG

__all__ = ["PTRAG", "ModelFileError", "SafeSaveMixin"]
