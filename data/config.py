"""Config schemas of the data package: plain dataclasses that OmegaConf/Hydra can type-check.

`DataConfig` fills the top-level `data` node (from `conf/data/<name>.yaml`); `MixtureConfig` fills each stage's
`mixture` node. train/ registers them in Hydra's ConfigStore; `compose()` below builds one from `conf/` directly.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class SourceConfig:
    """One corpus: a built-in recipe, local files or a hub data set."""

    kind: str = "local"  # udhr | bible | reasoning_gym | code | sotu | local | hub
    languages: Optional[List[str]] = None  # keep only these languages (ISO 639-3, or "python"); None keeps all
    options: Dict[str, Any] = field(default_factory=dict)  # recipe options, checked by the recipe's Options class


@dataclass
class TokenizerConfig:
    """Which tokenizer the shards are written with."""

    kind: str = "sentencepiece"  # sentencepiece (BPE trained here on the sources) | qwen3 (the released tokenizer.json)
    vocab_size: int = 8192  # sentencepiece: vocabulary size incl. byte-fallback and special tokens
    alpha: float = 0.3  # training sample: p(language) ∝ chars^alpha (1 = as found, 0 = every language equal)
    sample_chars: int = 4_000_000  # characters in the sentencepiece training sample
    character_coverage: float = 0.9995  # characters rarer than this get byte-fallback pieces, not their own
    seed: int = 0  # seed of the training sample
    path: Optional[str] = None  # use this ready tokenizer (.model or tokenizer.json) instead of training/fetching


@dataclass
class LengthBucketConfig:
    """Documents with min_tokens <= length <= max_tokens (incl. EOS) give `weight` of the stage's samples.

    A document joins the first bucket it fits; documents longer than the largest max_tokens are cut into pieces of
    that many tokens first (so a 50K-token document feeds a 16K-32K bucket instead of being left out).
    """

    min_tokens: int = 0  # shortest document in the bucket
    max_tokens: Optional[int] = None  # longest document in the bucket; None = no upper bound
    weight: float = 1.0  # share of the stage's samples drawn from this bucket


@dataclass
class MixtureConfig:
    """What one stage samples: source weights, language temperature, repeat cap, length buckets."""

    # source name -> relative weight (normalised); empty = `data.mixtures.<stage>`, else sources by token count
    weights: Dict[str, float] = field(default_factory=dict)
    language_alpha: float = 1.0  # within a source, p(language) ∝ tokens^alpha
    max_epochs: float = 4.0  # a component (source/language) repeats at most this often; its excess goes elsewhere
    length_buckets: List[LengthBucketConfig] = field(default_factory=list)  # empty = no length bucketing


@dataclass
class DataConfig:
    """Where the data lives, what it is made of and how it is tokenized."""

    name: str = "demo"  # names the prepared data set: shards go to <root>/<name>/
    # cache for downloads, corpora, tokenizers and shards (relative = to the cwd); $TRISTAGE_DATA_ROOT if set
    root: str = field(default_factory=lambda: os.environ.get("TRISTAGE_DATA_ROOT", ".cache/tristage"))
    # source name -> recipe: SourceConfig fields, checked against it by `to_data_config`. Typed Any because OmegaConf
    # refuses to add a plain dict to a dict of dataclasses, so `+data.sources.wiki={kind: hub, ...}` would fail.
    sources: Dict[str, Any] = field(default_factory=dict)
    # stage name -> {source: weight}, for each stage whose `mixture.weights` is empty: the weights name this data
    # set's sources, so they live with it (a data config of one's own brings its own; see README "Your own data").
    # Typed Any because OmegaConf does not convert `{en: 7}` to a float inside a nested dict; train.config does.
    mixtures: Dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # tokenizer to train or load
    num_proc: Optional[int] = None  # tokenization processes; None = all cores
    index_workers: Optional[int] = None  # threads building a stage's index arrays; None = one per core, up to 16
    shard_tokens: int = 1 << 28  # most tokens in one shard file; a larger component gets several files
    doc_masking: bool = False  # restart position ids and block attention at each document boundary


def to_data_config(node: Any) -> DataConfig:
    """A `DataConfig` from a DictConfig/dict (e.g. `cfg.data`), type-checked against the schema."""
    from omegaconf import OmegaConf

    if isinstance(node, DataConfig):
        out = node
    else:
        out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))
    if any(not isinstance(src, SourceConfig) for src in out.sources.values()):
        out = dataclasses.replace(out, sources={name: to_source_config(name, src) for name, src in out.sources.items()})
    if not out.root.strip():  # ${oc.env:TRISTAGE_DATA_ROOT,...} gives "" for a variable set but empty
        from data.errors import DataError

        raise DataError("config key 'data.root' is empty (TRISTAGE_DATA_ROOT set to an empty string?): the data set "
                        "would be written into the working directory; unset the variable or name a folder")
    return out


def check_data_config(cfg: DataConfig) -> None:
    """Refuse values that preparing the data cannot work with, naming the key and the value (DataError)."""
    import math

    from data.errors import DataError

    t = cfg.tokenizer
    # NaN (or a large alpha, chars**alpha overflowing to inf/inf) was a "cannot convert float NaN to integer"
    # traceback from the tokenizer's sample; outside [0, 1] the sample favours small languages or large ones
    # beyond their share, which no setting asks for
    if not (math.isfinite(t.alpha) and 0 <= t.alpha <= 1):
        raise DataError(f"config key 'data.tokenizer.alpha' = {t.alpha!r}: must be in [0, 1] (p(language) ∝ "
                        f"chars^alpha: 1 = as found, 0 = every language equal)")
    if cfg.shard_tokens < 1:  # was taken: one document per shard file
        raise DataError(f"config key 'data.shard_tokens' = {cfg.shard_tokens!r}: must be at least 1 (most tokens in "
                        f"one shard file)")
    if cfg.num_proc is not None and cfg.num_proc < 1:  # 0 and below were taken as "all cores", which is null
        raise DataError(f"config key 'data.num_proc' = {cfg.num_proc!r}: must be at least 1 (or null: all cores)")


def to_source_config(name: str, node: Any) -> SourceConfig:
    """`data.sources.<name>` as a `SourceConfig`; an unknown key or a wrong type is a DataError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from data.errors import DataError

    if isinstance(node, SourceConfig):
        return node
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SourceConfig), node))
    except (OmegaConfBaseException, ValueError) as e:
        raise DataError(f"data.sources.{name}: {str(e).splitlines()[0]}") from None


def check_mixture(mix: "MixtureConfig", key: str, weights_key: Optional[str] = None) -> None:
    """Refuse weights a stage cannot sample by (negative, infinite, NaN, all zero), naming the key (ValueError);
    `weights_key` is where the weights were set when not `<key>.weights` (a data config's `mixtures.<stage>`)."""
    import math

    weights_key = weights_key or f"{key}.weights"
    for src, w in mix.weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{weights_key}.{src} = {w}: must be a finite weight >= 0")
    if mix.weights and not any(w > 0 for w in mix.weights.values()):
        raise ValueError(f"{weights_key} = {dict(mix.weights)}: every weight is 0 (leave it empty to weigh the "
                         f"sources by their tokens)")
    for i, b in enumerate(mix.length_buckets):
        if not (math.isfinite(b.weight) and b.weight > 0):
            raise ValueError(f"{key}.length_buckets[{i}].weight = {b.weight}: must be a finite weight > 0")
        if b.min_tokens < 0 or (b.max_tokens is not None and b.max_tokens < max(b.min_tokens, 1)):
            raise ValueError(f"{key}.length_buckets[{i}]: min_tokens = {b.min_tokens}, max_tokens = {b.max_tokens}: "
                             f"a bucket needs 0 <= min_tokens <= max_tokens and max_tokens >= 1 (no document "
                             f"could fall in it)")
    if not math.isfinite(mix.language_alpha):
        raise ValueError(f"{key}.language_alpha = {mix.language_alpha}: must be finite")
    if not (math.isfinite(mix.max_epochs) and mix.max_epochs > 0):
        raise ValueError(f"{key}.max_epochs = {mix.max_epochs}: must be finite and > 0")


def to_mixture_config(node: Any) -> MixtureConfig:
    """A `MixtureConfig` from a DictConfig/dict, type-checked against the schema."""
    from omegaconf import OmegaConf

    if isinstance(node, MixtureConfig):
        return node
    merged = OmegaConf.merge(OmegaConf.structured(MixtureConfig), node)
    return OmegaConf.to_object(merged)


def compose(name: str = "demo", overrides: Sequence[str] = ()) -> DataConfig:
    """Compose `conf/data/<name>.yaml` through Hydra (overrides like `root=/tmp/x`, relative to the data node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # "root=/x" -> "data.root=/x"; "+sources.y.kind=local" -> "+data.sources.y.kind=local"
        prefixed = [re.sub(r"^([+~]*)", r"\1data.", o) for o in overrides]
        cfg = hydra_compose(overrides=[f"+data={name}", *prefixed])
    return to_data_config(cfg.data)
