"""Storage: a results directory on disk.

- ``files``: file mechanics (atomic writes, parquet tables, manifests, final tables as one set)
- ``chunks``: chunk directories (written as a unit, verified before they are joined, locks, merged streams)
- ``owned``: what calibjax wrote in a directory by its own records (what ``--overwrite`` removes)
- ``tables``: the result tables' columns, from the core's records
- ``results``: a results directory's rules (which numbers it holds, chunks, final tables, merge)
- ``reader``: reading final tables back (``load_results``, ``read_table``, ``Results``, ``load``)
- ``arrays``: the tables as labelled arrays (xarray) and their export to netCDF or zarr
- ``tensorboard``: the runs as TensorBoard runs (metrics against step, settings as hyper-parameters)
"""

from calibjax.storage import chunks, files, owned, reader, results, tables
from calibjax.storage.files import CorruptResults
from calibjax.storage.reader import Results, load_results, read_table, table_columns
from calibjax.storage.results import ResultsExist

__all__ = [
    "CorruptResults",
    "Results",
    "ResultsExist",
    "chunks",
    "files",
    "load_results",
    "owned",
    "read_table",
    "reader",
    "results",
    "table_columns",
    "tables",
]
