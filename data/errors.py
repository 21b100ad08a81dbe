"""The one exception type of the data package."""


class DataError(Exception):
    """Bad or missing data: the message names the file (and byte offset where one applies) and what to do."""
