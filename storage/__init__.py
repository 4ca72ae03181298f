"""maskmill storage: Parquet shards on any fsspec URL, a DuckDB catalog, statistics, plots,
COCO and SA-1B import and export. Imports neither prefect nor ray."""

from maskmill.storage.catalog import Catalog
from maskmill.storage.coco import ImportResult, export_coco, export_sa1b, import_coco
from maskmill.storage.errors import (
    CocoFormatError,
    GroundTruthConflictError,
    MaskSizeError,
    MissingImageError,
    StorageError,
    ValidationErrors,
    WriterConflictError,
)
from maskmill.storage.images import ImageInfo, read_image_info
from maskmill.storage.lease import StageLease
from maskmill.storage.rle import mask_id
from maskmill.storage.schema import SCHEMAS
from maskmill.storage.stats import compute_stats, format_stats
from maskmill.storage.store import Store
from maskmill.storage.writer import StageWriter, masks_table

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
