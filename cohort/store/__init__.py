"""The Parquet feature store: layout, versioned tables, atomic writes, a read API."""

from cohort.store.api import Store
from cohort.store.api import open_store as open
from cohort.store.layout import StoreLayout
from cohort.store.parquet import read_table, write_part
from cohort.store.table import TableDir

__all__ = ["Store", "StoreLayout", "TableDir", "open", "read_table", "write_part"]
