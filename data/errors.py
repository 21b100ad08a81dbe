"""The one exception type of the data package."""


class DataError(Exception):
    """Bad or missing data: the message names the file (and byte offset where one applies) and what to do."""


class ShardError(DataError):
    """A shard file that is not what its manifest (or its source's `_done.json`) lists: missing, truncated, other
    bytes. Shards are derived data: `python -m data.prepare` tokenizes their source again."""
