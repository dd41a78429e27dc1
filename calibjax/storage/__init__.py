"""Storage: a results directory on disk.

- ``files``: file mechanics (atomic writes, chunk directories, locks, merged parquet streams)
- ``tables``: the result tables' columns, from the core's records
- ``results``: a results directory's rules (which numbers it holds, chunks, final tables, merge)
- ``reader``: reading final tables back (``load_results``, ``read_table``, ``Results``)
"""

from calibjax.storage import files, reader, results, tables
from calibjax.storage.files import CorruptResults
from calibjax.storage.reader import Results, load_results, read_table, table_columns
from calibjax.storage.results import ResultsExist

__all__ = [
    "CorruptResults",
    "Results",
    "ResultsExist",
    "files",
    "load_results",
    "read_table",
    "reader",
    "results",
    "table_columns",
    "tables",
]
