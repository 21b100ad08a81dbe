"""What an evaluation runs on: a run directory, one stage's HF export, or one checkpoint folder.

A run directory names its stages (curriculum order), their trained lengths and its data set in `config.yaml`;
the data set's manifest gives the tokenizer and the held-out text. An HF export (`<run_dir>/hf/<stage>/`) or a
checkpoint (`<run_dir>/checkpoints/<tag>/`, which holds its own config.yaml) finds its run from where it lies;
an HF directory from elsewhere needs `--manifest` and `--seq-len`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.tokenizer import Tokenizer, load_tokenizer
from models.qwen3 import Qwen3ForCausalLM

REPO = Path(__file__).resolve().parents[2]


class EvalError(ValueError):
    """A target that cannot be evaluated; the message says what is missing."""


@dataclass
class StageModel:
    """One set of weights to evaluate and the length it was trained at."""

    name: str  # the stage's name (or the folder's, outside a run)
    path: Path  # HF directory (config.json) or checkpoint folder (meta.json)
    seq_len: int  # the stage's trained sequence length


@dataclass
class EvalTarget:
    """The stages to evaluate, the data set they were trained on and where results go."""

    stages: List[StageModel]
    manifest: Path
    first_seq_len: int  # the first (General) stage's length: "4x the General length" is measured from it
    out_dir: Path
    order: List[str]  # the run's curriculum (or just the evaluated stage)
    seq_lens: Dict[str, int]  # trained length of every stage in `order`
    run_dir: Optional[Path] = None
    _tokenizer: Optional[Tokenizer] = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (from the manifest), loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest)
        return self._tokenizer


def eval_device(name: str = "auto") -> torch.device:
    """cuda when asked for or available (auto), else cpu; EvalError for another name or a CUDA that is absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:<n>)") from None
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {name!r}: must be auto, cpu, cuda or cuda:<n>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name!r}: this machine has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EvalError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _json(path: Path) -> Dict[str, Any]:
    """A JSON file of the target (meta.json), EvalError naming it when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None


def _yaml(path: Path) -> Dict[str, Any]:
    """A run's or checkpoint's config.yaml, resolved; EvalError naming it when it cannot be read."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise EvalError(f"{path}: cannot read it as a config ({type(e).__name__}: {e})") from None


def _check_weights(stage: StageModel) -> None:
    """Refuse, naming the file, a stage folder whose weight files are missing (a copy cut short, a pruned run)."""
    path = stage.path
    if (path / "config.json").exists():
        wanted = [path / "model.safetensors", path / "model.safetensors.index.json"]
        expert_parallel = False
    else:
        meta = _json(path / "meta.json")
        wanted = ([*path.glob("*model_states.pt")] if meta.get("zero_stage") == 3
                  else [path / "mp_rank_00_model_states.pt"])
        expert_parallel = meta.get("expert_parallel_size", 1) > 1
    if not any(p.exists() for p in wanted):
        names = ", ".join(p.name for p in wanted) or "DeepSpeed model states (*model_states.pt)"
        raise EvalError(f"{path}: no weights here ({names} missing)")
    if expert_parallel:
        from train.expert_parallel import expert_files, missing_expert_files

        missing = missing_expert_files(expert_files(path, _checkpoint_model(path)))
        if missing:
            raise EvalError(f"{path}: incomplete expert-parallel checkpoint ({len(missing)} per-expert files "
                            f"missing, e.g. {missing[0].name})")


def _check_seq_len(path: Path, seq_len: int) -> None:
    """Refuse a --seq-len past the HF model's positions (max_position_embeddings): the evaluations read windows of
    the trained length and use it as the DCA chunk, which the RoPE tables must hold (a traceback came halfway
    through, after some results were written)."""
    from models.hf import read_hf_config

    try:
        positions = read_hf_config(path).max_position_embeddings
    except ValueError as e:  # a damaged config.json, named
        raise EvalError(str(e)) from None
    if seq_len > positions:
        raise EvalError(f"--seq-len {seq_len}: beyond the {positions} positions of {path / 'config.json'} "
                        f"(max_position_embeddings); a model cannot have been trained at a longer length")


def _check_tokenizer(stage: StageModel, manifest: Path, tokenizer: Tokenizer) -> None:
    """Refuse weights trained with another tokenizer than the data set's (their ids stand for other text, and every
    number would come out without an error) or with fewer embedding rows than its ids."""
    from data.shards import read_manifest

    want = read_manifest(manifest)["tokenizer"]
    path = stage.path
    if (path / "config.json").exists():  # an HF export carries its tokenizer's files (one from elsewhere may not)
        from models.hf import read_hf_config

        try:
            rows = read_hf_config(path).vocab_size
        except ValueError as e:  # a damaged config.json, named
            raise EvalError(str(e)) from None
        have = None
        if any((path / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
            own = load_tokenizer(path)
            have = want["fingerprint"] if own.same_ids(tokenizer) else own.fingerprint
    else:
        meta = _json(path / "meta.json")
        rows = meta.get("model_shape", {}).get("vocab_size", want["vocab_size"])
        have = meta.get("tokenizer_fingerprint")
    if have is not None and have != want["fingerprint"]:
        raise EvalError(f"{path}: trained with tokenizer {have}, not the data set's {want['fingerprint']} "
                        f"({manifest}); pass --manifest of the data set it was trained on")
    if rows < want["vocab_size"]:
        raise EvalError(f"{path}: {rows} embedding rows, fewer than the {want['vocab_size']} ids of the data set's "
                        f"tokenizer ({manifest})")


def eval_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (as training), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _checkpoint_model(path: Path) -> Qwen3ForCausalLM:
    """The model of a checkpoint folder, on the meta device, with the RoPE base its stage trained at."""
    meta = _json(path / "meta.json")
    cfg = _yaml(path / "config.yaml")["model"]
    cfg["rope_theta"] = float(meta["rope_theta"])  # the stage's base, as the HF export would carry it
    with torch.device("meta"):
        return Qwen3ForCausalLM(cfg)


def load_model(path: Path, device: torch.device, dtype: Optional[torch.dtype] = None) -> Qwen3ForCausalLM:
    """Weights from an HF directory or a tristage checkpoint folder, in eval mode."""
    from models.hf import load_hf

    dtype = dtype or eval_dtype(device)
    path = Path(path)
    if (path / "config.json").exists():
        try:
            return load_hf(path, device=device, dtype=dtype).eval()
        except (OSError, ValueError) as e:  # a damaged config.json or weight file; load_hf's message names it
            raise EvalError(f"{path}: cannot load the HF directory ({e})") from None
    if not (path / "meta.json").exists():
        raise EvalError(f"{path}: neither an HF directory (config.json) nor a checkpoint folder (meta.json)")
    meta = _json(path / "meta.json")
    model = _checkpoint_model(path)
    from train.engine import CheckpointLoadError, safe_torch_load  # DeepSpeed's files, without running pickles

    try:
        with safe_torch_load():
            if meta.get("zero_stage") == 3:  # parameters are partitioned: DeepSpeed's own consolidation
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
            else:
                state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
                if meta.get("expert_parallel_size", 1) > 1:  # the experts are in files of their own
                    from train.expert_parallel import read_expert_files

                    state.update(read_expert_files(path, model))
    except (OSError, CheckpointLoadError) as e:  # torch reads a truncated file as "OSError: Invalid argument"
        raise EvalError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {e})") from None
    model.to_empty(device="cpu")  # allocates, rebuilds the RoPE tables and re-ties the head
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def _run_config(run_dir: Path) -> Dict[str, Any]:
    return _yaml(run_dir / "config.yaml")


def _manifest_of(cfg: Dict[str, Any]) -> Path:
    """The run's manifest; a relative data.root is tried from here, then from the repository (where runs start)."""
    from data.config import to_data_config
    from data.prepare import manifest_path

    data = to_data_config(cfg["data"])
    path = manifest_path(data)
    if not path.exists() and not Path(data.root).expanduser().is_absolute():
        path = REPO / data.root / data.name / "manifest.json"
    if not path.exists():
        raise EvalError(f"the run's data set {manifest_path(data)} is not prepared here; pass --manifest")
    return path


def _seq_len(cfg: Dict[str, Any], stage: str) -> int:
    return int(cfg["curriculum"]["stages"][stage]["seq_len"])


def resolve(target: Path, out: Optional[Path] = None, manifest: Optional[Path] = None,
            stages: Optional[List[str]] = None, seq_len: Optional[int] = None) -> EvalTarget:
    """Work out the stages, data set and output folder of a run directory, HF export or checkpoint folder."""
    target = Path(target).absolute()
    run_dir: Optional[Path] = None
    cfg: Optional[Dict[str, Any]] = None
    if (target / "config.yaml").exists() and not (target / "meta.json").exists():  # a run directory
        if seq_len is not None:
            raise EvalError(f"--seq-len {seq_len}: only for an HF directory; a run's stages have their lengths")
        run_dir, cfg = target, _run_config(target)
        order = cfg["curriculum"]["order"]
        found = [StageModel(s, target / "hf" / s, _seq_len(cfg, s)) for s in order
                 if (target / "hf" / s / "config.json").exists()]
        if not found:  # no HF exports: the stage-end checkpoints
            ckpts = target / "checkpoints"
            for s in order:
                ends = sorted(p for p in ckpts.glob(f"*-{s}-step*") if (p / "meta.json").exists()
                              and _json(p / "meta.json")["state"]["stage_complete"])
                if ends:
                    found.append(StageModel(s, ends[-1], _seq_len(cfg, s)))
        if not found:
            raise EvalError(f"{target}: no hf/<stage>/ exports and no finished stage checkpoints")
    elif (target / "meta.json").exists():  # a checkpoint folder carries its run's config
        if seq_len is not None:
            raise EvalError(f"--seq-len {seq_len}: only for an HF directory; a checkpoint's config has its length")
        cfg = _yaml(target / "config.yaml")
        meta = _json(target / "meta.json")
        # a checkpoint from the middle of a stage gets results of its own (eval/<its tag>/), so that they never
        # replace the stage's: the summary and the report read eval/<stage>/ as "after <stage>"
        name = meta["stage"] if meta.get("state", {}).get("stage_complete", True) else target.name
        found = [StageModel(name, target, _seq_len(cfg, meta["stage"]))]
        run_dir = target.parent.parent if (target.parent.parent / "config.yaml").exists() else None
    elif (target / "config.json").exists():  # an HF directory, maybe <run_dir>/hf/<stage>
        parent = target.parent.parent
        if (parent / "config.yaml").exists():
            run_dir, cfg = parent, _run_config(parent)
        if seq_len is not None:
            _check_seq_len(target, seq_len)
        if cfg is not None and target.name in cfg["curriculum"]["stages"]:
            found = [StageModel(target.name, target, seq_len if seq_len is not None else _seq_len(cfg, target.name))]
        elif seq_len is not None:
            found = [StageModel(target.name, target, seq_len)]
        else:
            need = "--seq-len (the trained length)" + (" and --manifest (the data set it was trained on)"
                                                       if manifest is None else "")
            raise EvalError(f"{target}: not inside a run directory; pass {need}")
    else:
        raise EvalError(f"{target}: not a run directory (config.yaml), HF directory (config.json) "
                        f"or checkpoint folder (meta.json)")
    if stages:
        unknown = sorted(set(stages) - {s.name for s in found})
        if unknown:
            raise EvalError(f"{target}: no stage(s) {unknown}; found {[s.name for s in found]}")
        found = [s for s in found if s.name in stages]
    for st in found:
        _check_weights(st)
    if manifest is None:
        if cfg is None:
            raise EvalError(f"{target}: pass --manifest (the data set the model was trained on)")
        manifest = _manifest_of(cfg)
    elif not Path(manifest).is_file():
        raise EvalError(f"--manifest {manifest}: no such file (a data set's manifest.json)")
    tokenizer = load_tokenizer(Path(manifest))
    for st in found:
        _check_tokenizer(st, Path(manifest), tokenizer)
    if cfg is not None:
        order = list(cfg["curriculum"]["order"])
        seq_lens = {s: _seq_len(cfg, s) for s in order}
    else:
        order, seq_lens = [found[0].name], {found[0].name: found[0].seq_len}
    if out is None:
        # outside a run, beside the model rather than in it: a later save_hf or checkpoint prune replaces the
        # model's folder whole, results and all
        out = (run_dir / "eval") if run_dir is not None else target.with_name(f"{target.name}-eval")
    out = Path(out)
    taken = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not taken.is_dir():  # said before any stage runs: it was a NotADirectoryError once the first result was due
        what = "a file" if taken == out.absolute() else f"under the file {taken}"
        raise EvalError(f"{out}: {what}, not a folder for the results; nothing was written (choose another --out)")
    return EvalTarget(found, Path(manifest), seq_lens[order[0]], out, order, seq_lens, run_dir, tokenizer)
