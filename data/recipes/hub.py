"""Hub data sets by name through `datasets.load_dataset`: needs a network (or a filled HF cache)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data.errors import DataError
from data.io import write_error


@dataclass
class Options:
    dataset: str = ""  # hub name, e.g. "wikimedia/wikipedia"
    subset: Optional[str] = None  # config name, e.g. "20231101.fr"
    split: str = "train"  # split to read
    revision: Optional[str] = None  # pin a commit for reproducibility
    text_field: str = "text"  # column with the document text
    language_field: str = "language"  # column with each document's language, if any
    language: str = "und"  # language of every document when there is no language column
    split_field: str = "split"  # column with "train"/"heldout", if any


def load(opts: Options, cache_dir: Path, source: str):
    """(`datasets.Dataset`, identity (datasets' fingerprint), provenance); a DataError when the hub is unreachable."""
    import datasets

    if not opts.dataset:
        raise DataError(f"source '{source}': hub sources need `options.dataset`")
    try:
        ds = datasets.load_dataset(opts.dataset, opts.subset, split=opts.split, revision=opts.revision,
                                   cache_dir=str(cache_dir))
    except (ConnectionError, OSError) as e:
        written = write_error(e, cache_dir)
        if written is not None:  # a full disk under the download or its arrow copy: not the network's fault
            raise written from e
        raise DataError(
            f"source '{source}': hub data set {opts.dataset!r} could not be loaded ({type(e).__name__}: {e}). "
            "This needs a network that reaches the Hugging Face hub; without one, download the files elsewhere "
            "and use a `local` source with their paths.") from e
    return ds, ds._fingerprint, {"dataset": opts.dataset, "subset": opts.subset, "split": opts.split,
                                 "revision": opts.revision}
