"""Errors raised by the storage layer. Each message says what was wrong and where."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage layer raises on purpose."""


class WriterConflictError(StorageError):
    """A second writer tried to write a round and stage that another live writer holds."""


class CocoFormatError(StorageError, ValueError):
    """A COCO file is not valid JSON or an entry in it is malformed."""


class MissingImageError(StorageError, FileNotFoundError):
    """An image file named by an import is not there."""


class MaskSizeError(StorageError, ValueError):
    """A mask's height and width do not match its image's."""


class GroundTruthConflictError(StorageError):
    """An import would give an image a second set of ground truth from another file."""


class ValidationErrors(StorageError, ValueError):
    """Several problems found while validating an import; nothing was written.

    ``errors`` holds every problem found (each a :class:`StorageError`), so a user fixes them all
    in one pass instead of one per run.
    """

    def __init__(self, source: str, errors: list[StorageError]) -> None:
        self.source = source
        self.errors = errors
        shown = "\n".join(f"  - {type(e).__name__}: {e}" for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(
            f"{source}: {len(errors)} problem(s), nothing was written to the store:\n{shown}{more}"
        )
