"""Reasoning problems with worked answers from reasoning-gym, in Qwen3's chat format with a <think> block.

gsm_symbolic carries its own step-by-step answer; for basic_arithmetic and chain_sum the steps are written here by
reducing the expression one operation at a time. reasoning-gym item i of (task, seed) is generated from
`Random(seed + i)`, so training uses generator seeds [seed, seed + size): the manifest records them so evaluation can
draw from seeds never trained on.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from data.errors import DataError

VERSION = 1
PACKAGE = "reasoning-gym==0.1.25"


@dataclass
class Options:
    tasks: Dict[str, Any] = field(default_factory=lambda: {  # task -> {size, seed}
        "gsm_symbolic": {"size": 2000, "seed": 0},
        "basic_arithmetic": {"size": 2000, "seed": 0},
        "chain_sum": {"size": 2000, "seed": 0},
    })


def chat(question: str, thinking: str, answer: str) -> str:
    """One problem in Qwen3's chat format: user turn, assistant turn with the reasoning in <think>."""
    return (f"<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\n{thinking}\n</think>\n\n{answer}<|im_end|>")


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _value(node: ast.AST) -> Optional[Fraction]:
    """The number a node stands for if it is a literal (possibly negated), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    return None


def _literal(v: Fraction) -> ast.AST:
    if v.denominator != 1:
        raise ValueError("non-integer intermediate")
    n = int(v)
    return ast.UnaryOp(ast.USub(), ast.Constant(-n)) if n < 0 else ast.Constant(n)


def _reduce_once(node: ast.AST) -> tuple[ast.AST, Optional[str]]:
    """Evaluate the leftmost innermost operation; return (new tree, "a op b = c") or (node, None) if none left."""
    if isinstance(node, ast.BinOp):
        a, b = _value(node.left), _value(node.right)
        if a is not None and b is not None:
            c = _OPS[type(node.op)](a, b)
            return _literal(c), f"{ast.unparse(node)} = {ast.unparse(_literal(c))}"
        for side in ("left", "right"):
            new, step = _reduce_once(getattr(node, side))
            if step:
                setattr(node, side, new)
                return node, step
    elif isinstance(node, ast.UnaryOp):
        v = _value(node.operand)
        if v is not None and isinstance(node.operand, ast.UnaryOp):  # -(-5) -> 5
            w = -v if isinstance(node.op, ast.USub) else v
            return _literal(w), f"{ast.unparse(node)} = {ast.unparse(_literal(w))}"
        new, step = _reduce_once(node.operand)
        if step:
            node.operand = new
            return node, step
    return node, None


def worked_steps(expression: str) -> tuple[List[str], str]:
    """(steps, result) of evaluating an arithmetic expression one operation at a time, exactly."""
    tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body
    steps = []
    while _value(tree) is None:
        tree, step = _reduce_once(tree)
        if step is None:
            raise ValueError(f"cannot reduce {expression}")
        steps.append(step if _value(tree) is not None else f"{step}, so the expression is now {ast.unparse(tree)}")
    return steps, ast.unparse(_literal(_value(tree)))


def _document(task: str, item: dict) -> Optional[str]:
    question, answer, meta = item["question"], str(item["answer"]), item["metadata"]
    if task == "gsm_symbolic":
        thinking = meta["answer_cot"]
    else:
        try:
            steps, result = worked_steps(meta["expression"])
        except (ValueError, SyntaxError, ZeroDivisionError):
            return None
        if result != answer:  # a convention we do not reproduce (e.g. rounding); keep only checked answers
            return None
        thinking = "\n".join(steps) + f"\nThe answer is {answer}."
    return chat(question, thinking, answer)


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"the reasoning_gym recipe needs `pip install {PACKAGE}` (the [data] extra)") from None
    return reasoning_gym


def documents(opts: Options, downloads: Path) -> Iterator[dict]:
    """One chat-formatted document per generated problem (language "eng")."""
    rg = _reasoning_gym()
    for task, spec in opts.tasks.items():
        size, seed = int(spec["size"]), int(spec["seed"])
        for i, item in enumerate(rg.create_dataset(task, size=size, seed=seed)):
            text = _document(task, item)
            if text:
                yield {"id": f"reasoning_gym/{task}/{seed}/{i}", "text": text, "language": "eng", "split": "train"}


def provenance(opts: Options) -> dict:
    """Package and the generator seeds used for training (evaluate with seeds >= seed + size)."""
    from importlib.metadata import version

    _reasoning_gym()
    return {"package": f"pypi reasoning-gym=={version('reasoning-gym')}", "licence": "Apache-2.0",
            "generator_seeds": {t: {"seed": int(s["seed"]), "size": int(s["size"]),
                                    "first_unused_seed": int(s["seed"]) + int(s["size"])}
                                for t, s in opts.tasks.items()}}
