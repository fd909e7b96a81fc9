"""The Parquet feature store: layout, atomic writes, reads."""

from cohort.store.layout import StoreLayout
from cohort.store.parquet import existing_keys, read_table, write_part

__all__ = ["StoreLayout", "existing_keys", "read_table", "write_part"]
