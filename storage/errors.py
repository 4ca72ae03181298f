"""Errors raised by the storage layer. Each message says what was wrong and where."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage layer raises on purpose."""


class WriterConflictError(StorageError):
    """A second writer tried to write a round and stage that another live writer holds."""


class ClaimLostError(WriterConflictError):
    """A writer's claim on an image is no longer its own (it expired and another writer took
    it, or it was released): the writer must not write that image. The message names the image
    and its holder now."""


class ImageDoneError(WriterConflictError):
    """An image's masks shard is already committed in this round and stage (by another writer
    that held its claim): a second commit is refused, so an image is written only once."""


class NoExclusiveCreateError(StorageError):
    """A store whose filesystem cannot create an object only when none is there (an atomic
    exclusive create: a hard link locally, a conditional PUT with ``If-None-Match: *`` on S3):
    writer leases, image claims and shared commits would race there, so nothing that needs
    them is written. The message names the store's URL and what failed."""


class NotAStoreError(StorageError):
    """A store URL names no store a command can use: nothing there, a file, or a folder without
    any of a store's tables (a typo, usually)."""


class CocoFormatError(StorageError, ValueError):
    """A COCO file is not valid JSON or an entry in it is malformed."""


class BadImageError(StorageError, ValueError):
    """An image file that cannot be used; ``reason`` is a short code, the message says why.

    Reasons: ``missing``, ``empty``, ``not_an_image``, ``truncated``, ``too_small``,
    ``decompression_bomb``, ``unsupported_mode``, ``unreadable`` (the file system refused it) and
    ``size_changed`` (the file no longer decodes to the size the images table recorded). The
    message is ``[<entry>: ]<uri>: <reason>: <detail>``; ``entry`` names where the file was
    named (a COCO entry), when that helps the user find it.
    """

    def __init__(self, uri: str, reason: str, detail: str, entry: str | None = None) -> None:
        where = f"{entry}: " if entry else ""
        super().__init__(f"{where}{uri}: {reason}: {detail}")
        self.uri = uri
        self.reason = reason
        self.detail = detail
        self.entry = entry

    def __reduce__(self) -> tuple:
        # Rebuilt from its fields (the default would pass the message as ``uri``).
        return BadImageError, (self.uri, self.reason, self.detail, self.entry)


class MissingImageError(BadImageError, FileNotFoundError):
    """An image file is not there (reason ``missing``)."""

    def __init__(self, uri: str, entry: str | None = None) -> None:
        super().__init__(uri, "missing", "image file not found", entry)

    def __reduce__(self) -> tuple:
        return MissingImageError, (self.uri, self.entry)


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
