"""maskmill storage: Parquet shards on any fsspec URL, a DuckDB catalog, statistics, plots,
COCO and SA-1B import, folder ingest and export, the one image reader (``storage.images``) and
the questions the engine asks (``storage.queries``). Imports neither prefect nor ray."""

from maskmill.storage.catalog import Catalog
from maskmill.storage.claims import CLAIM_TTL_S, ImageClaims
from maskmill.storage.coco import ImportResult, export_coco, export_sa1b, import_coco
from maskmill.storage.embeddings import EmbeddingCache, cache_size
from maskmill.storage.errors import (
    BadImageError,
    ClaimLostError,
    CocoFormatError,
    GroundTruthConflictError,
    ImageDoneError,
    MaskSizeError,
    MissingImageError,
    NoExclusiveCreateError,
    NotAStoreError,
    StorageError,
    ValidationErrors,
    WriterConflictError,
)
from maskmill.storage.images import ImageInfo, load_image, read_image_info
from maskmill.storage.ingest import ingest_folder
from maskmill.storage.lease import StageLease
from maskmill.storage.rle import mask_id
from maskmill.storage.schema import SCHEMAS
from maskmill.storage.stats import compute_stats, format_stats
from maskmill.storage.store import Store
from maskmill.storage.writer import StageWriter, masks_table

__all__ = [
    "CLAIM_TTL_S",
    "SCHEMAS",
    "BadImageError",
    "Catalog",
    "ClaimLostError",
    "CocoFormatError",
    "EmbeddingCache",
    "GroundTruthConflictError",
    "ImageClaims",
    "ImageDoneError",
    "ImageInfo",
    "ImportResult",
    "MaskSizeError",
    "MissingImageError",
    "NoExclusiveCreateError",
    "NotAStoreError",
    "StageLease",
    "StageWriter",
    "StorageError",
    "Store",
    "ValidationErrors",
    "WriterConflictError",
    "cache_size",
    "compute_stats",
    "export_coco",
    "export_sa1b",
    "format_stats",
    "import_coco",
    "ingest_folder",
    "load_image",
    "mask_id",
    "masks_table",
    "read_image_info",
]
