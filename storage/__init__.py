"""maskmill storage: Parquet shards on any fsspec URL, a DuckDB catalog, statistics, plots,
COCO and SA-1B import and export. Imports neither prefect nor ray."""

from storage.catalog import Catalog
from storage.coco import ImportResult, export_coco, export_sa1b, import_coco
from storage.errors import (
    CocoFormatError,
    GroundTruthConflictError,
    MaskSizeError,
    MissingImageError,
    StorageError,
    ValidationErrors,
    WriterConflictError,
)
from storage.images import ImageInfo, read_image_info
from storage.lease import StageLease
from storage.rle import mask_id
from storage.schema import SCHEMAS
from storage.stats import compute_stats, format_stats
from storage.store import Store
from storage.writer import StageWriter, masks_table

__all__ = [
    "SCHEMAS",
    "Catalog",
    "CocoFormatError",
    "GroundTruthConflictError",
    "ImageInfo",
    "ImportResult",
    "MaskSizeError",
    "MissingImageError",
    "StageLease",
    "StageWriter",
    "StorageError",
    "Store",
    "ValidationErrors",
    "WriterConflictError",
    "compute_stats",
    "export_coco",
    "export_sa1b",
    "format_stats",
    "import_coco",
    "mask_id",
    "masks_table",
    "read_image_info",
]
