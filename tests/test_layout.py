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


def test_ci_runs_the_readmes_two_commands_word_for_word():
    """`.ci/run` is the README's test command in a fresh environment: the set-up a user copies is the one CI checks
    (a fresh virtual environment needs the pip/setuptools/wheel step, which only .ci/run had)."""
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up on a fresh machine: two commands", 1)[1].split("\n## ", 1)[0]
    demo, tests = [line.strip() for line in setup.splitlines() if line.startswith("    pip install")]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
    assert demo.replace("'.[data]' && python -m train", "'.[test,data]' && python -m pytest -q -n 2") == tests


def test_readme_layout_names_every_file():
    """README "Layout" names each file of the packages and launch/ (a subfolder by its name), so a new file cannot
    go unlisted there: the section had fallen behind (no schedule.py, reshard.py, dca.py, ...)."""
    layout = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1]
    for top in ["models", "data", "train", "launch"]:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT / top)
            if not path.is_file() or path.name == "__init__.py" or "__pycache__" in rel.parts:
                continue
            name = f"{rel.parts[0]}/" if len(rel.parts) > 1 else path.name
            assert name in layout, f"README Layout does not name {top}/{rel}"
