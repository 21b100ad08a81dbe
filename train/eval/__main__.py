"""`python -m train.eval {ppl,reasoning,passkey,position_loss,all} TARGET [options]`.

TARGET is a run directory (every stage's hf/<stage>/ export), one HF export, or one checkpoint folder. Results go
to <run_dir>/eval/<stage>/<evaluation>.{json,md} (or --out) and <run_dir>/eval/summary.md. The defaults are small
enough for the tiny CPU demo model; raise --problems, --trials, --windows and --max-tokens on a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from train.eval.extend import MODES
from data.errors import DataError
from train.eval.reasoning import TASKS, check_tasks
from train.eval.suite import EVALUATIONS, Sizes, evaluate
from train.eval.target import EvalError, eval_device, resolve


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> List[str]:
    return [x for x in text.split(",") if x]


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value
    return parse


def _depths(text: str) -> List[float]:
    values = _floats(text)
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: needle depths must lie in [0, 1]")
    return values


def _lengths(text: str) -> List[int]:
    values = _ints(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: lengths must be positive")
    return values


def parser() -> argparse.ArgumentParser:
    """The command line."""
    d = Sizes()
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaluation", choices=[*EVALUATIONS, "all"])
    p.add_argument("target", type=Path, help="run directory, HF export directory or checkpoint folder")
    p.add_argument("--stage", type=_names, default=None, help="comma-separated stages of a run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: <run_dir>/eval)")
    p.add_argument("--manifest", type=Path, default=None, help="data set manifest (default: the run's)")
    p.add_argument("--seq-len", type=_at_least(1), default=None, help="trained length of an HF directory outside a run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-tokens", type=_at_least(1), default=d.ppl_max_tokens,
                   help="ppl: held-out tokens per component")
    p.add_argument("--tasks", type=_names, default=list(d.tasks), help=f"reasoning tasks (default {','.join(TASKS)})")
    p.add_argument("--problems", type=_at_least(1), default=d.problems, help="reasoning: problems per task")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=d.max_new_tokens, help="reasoning: generation budget")
    p.add_argument("--depths", type=_depths, default=list(d.depths), help="passkey: needle depths in [0, 1]")
    p.add_argument("--trials", type=_at_least(1), default=d.trials, help="passkey: keys per (length, depth)")
    p.add_argument("--windows", type=_at_least(1), default=d.windows, help="position_loss: windows per length")
    p.add_argument("--lengths", type=_lengths, default=[], help="passkey / position_loss lengths (default: planned "
                   "from the General and the stage's trained lengths, out to 4x)")
    p.add_argument("--modes", type=_names, default=list(MODES), help="plain,yarn,dca")
    p.add_argument("--dca-local-size", type=_at_least(0), default=0,
                   help="DCA local window (default: trained length / 8)")
    p.add_argument("--batch-size", type=_at_least(1), default=d.batch_size,
                   help="ppl windows / reasoning prompts per forward")
    p.add_argument("--long-batch-size", type=_at_least(1), default=d.long_batch_size,
                   help="passkey prompts / position_loss windows per forward")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the evaluation; exit 2 on a target that cannot be evaluated."""
    args = parser().parse_args(argv)
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        print(f"error: --modes {bad}: not in {MODES}", file=sys.stderr)
        return 2
    which = EVALUATIONS if args.evaluation == "all" else (args.evaluation,)
    try:
        if "reasoning" in which:
            check_tasks(args.tasks)
        target = resolve(args.target, args.out, args.manifest, args.stage, args.seq_len)
        device = eval_device(args.device)
    except (EvalError, DataError) as e:  # before any stage runs: nothing half written
        print(f"error: {e}", file=sys.stderr)
        return 2
    short = {s.name: s.seq_len for s in target.stages if "dca" in args.modes and args.dca_local_size >= s.seq_len}
    if short:  # checked before any stage runs: a failure halfway left some stages' results and no summary
        print(f"error: --dca-local-size {args.dca_local_size}: must be below the trained length (the DCA chunk) of "
              f"every stage evaluated; trained lengths {short}", file=sys.stderr)
        return 2
    sizes = Sizes(ppl_max_tokens=args.max_tokens, tasks=tuple(args.tasks), problems=args.problems,
                  max_new_tokens=args.max_new_tokens, depths=tuple(args.depths), trials=args.trials,
                  windows=args.windows, batch_size=args.batch_size, long_batch_size=args.long_batch_size,
                  modes=tuple(args.modes),
                  dca_local_size=args.dca_local_size, lengths=args.lengths)
    try:
        summaries = evaluate(target, sizes, which, device)
    except (EvalError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stage, s in summaries.items():
        print(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "stage"))
    print(f"results in {target.out_dir} (summary.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
