"""Click-log data: schemas, raw log -> Parquet conversion, synthetic logs, and the rank-sharded loader.

Bottom of the package's data flow: nothing here imports the rest of ``multiembed`` but ``runtime``. Importing this
package is cheap (no torch, no pyarrow); the loader imports torch / torchrec on first use.
"""
