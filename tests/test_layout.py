"""The repository keeps the layout the design card fixes and models/ stays pure PyTorch."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout():
    for name in ["train", "data", "models", "conf", "launch", "tests", "setup.cfg"]:
        assert (ROOT / name).exists(), name


def test_models_imports_no_framework():
    banned = {"deepspeed", "hydra", "omegaconf", "wandb"}
    for path in (ROOT / "models").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert n.split(".")[0] not in banned, f"{path}: imports {n}"
