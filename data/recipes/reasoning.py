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
    # task -> {size, seed}, e.g. {gsm_symbolic: {size: 2000, seed: 0}}; no default, since config dicts merge
    # with a default rather than replace it
    tasks: Dict[str, Any] = field(default_factory=dict)


def chat(question: str, thinking: str, answer: str) -> str:
    """One problem in Qwen3's chat format: user turn, assistant turn with the reasoning in <think>."""
    return (f"<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\n{thinking}\n</think>\n\n{answer}<|im_end|>")


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PRECEDENCE = {ast.Add: 1, ast.Sub: 1, ast.Mult: 2, ast.Div: 2}


def _show(node: ast.AST) -> str:
    """An expression as a person writes it (ast.unparse would print -(-1) as "--1")."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.UnaryOp):
        inner = _show(node.operand)
        return f"-{inner}" if isinstance(node.operand, ast.Constant) else f"-({inner})"
    p = _PRECEDENCE[type(node.op)]
    left, right = _show(node.left), _show(node.right)
    if isinstance(node.left, ast.BinOp) and _PRECEDENCE[type(node.left.op)] < p:
        left = f"({left})"
    if isinstance(node.right, ast.BinOp) and _PRECEDENCE[type(node.right.op)] <= p:
        right = f"({right})"
    return f"{left} {_SYMBOL[type(node.op)]} {right}"


def _value(node: ast.AST) -> Optional[Fraction]:
    """The number a literal node stands for (an integer, or a negated one), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        v = _value(node.operand)
        return None if v is None else -v
    return None


def _literal(v: Fraction) -> ast.AST:
    if v.denominator != 1:
        raise ValueError("non-integer intermediate")
    n = int(v)
    return ast.UnaryOp(ast.USub(), ast.Constant(-n)) if n < 0 else ast.Constant(n)


def _binop(node: ast.AST) -> Optional[Fraction]:
    """The result of `a op b` when both operands are literals, else None."""
    if isinstance(node, ast.BinOp):
        a, b = _value(node.left), _value(node.right)
        if a is not None and b is not None:
            return _OPS[type(node.op)](a, b)
    return None


def _reduce_once(node: ast.AST) -> tuple[ast.AST, Optional[str]]:
    """Evaluate the leftmost innermost operation; return (new tree, "expr = result") or (node, None) if none left."""
    if _value(node) is not None:
        return node, None
    c = _binop(node)
    if c is None and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _value(node.operand)
        inner = inner if inner is not None else _binop(node.operand)
        c = None if inner is None else -inner  # -(a op b) and -(-n) in one step, so no "--n" is ever shown
    if c is not None:
        return _literal(c), f"{_show(node)} = {_show(_literal(c))}"
    for child in ("left", "right", "operand"):
        if hasattr(node, child):
            new, step = _reduce_once(getattr(node, child))
            if step:
                setattr(node, child, new)
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
        steps.append(step if _value(tree) is not None else f"{step}, so the expression is now {_show(tree)}")
    return steps, _show(tree)


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
    if not opts.tasks:
        raise DataError("reasoning_gym source: options.tasks is empty; e.g. {chain_sum: {size: 1000, seed: 0}}")
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
