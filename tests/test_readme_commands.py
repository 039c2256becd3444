"""The README's example commands (not the install / test quick-start ones) run in a
temporary copy of the repository and leave `git status` clean there: no README
command writes into the tree. Their scratch paths (/tmp/...) are moved into the
test's own temporary directory; `fused-margin` runs as `python -m fused_margin.cli`
from the copy. About 25 s on 2 cores (not marked slow: it stays in every run)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        if "pip install" in block:  # the quick-start set-up commands: CI runs those itself
            continue
        cmds += [line.strip() for line in block.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
    return cmds


def test_readme_has_example_commands():
    cmds = readme_example_commands()
    assert cmds and all(c.startswith("fused-margin ") for c in cmds), cmds
    assert any(" train " in f" {c} " for c in cmds)


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout


def test_readme_commands_leave_the_tree_clean(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    copy, scratch = tmp_path / "repo", tmp_path / "scratch"
    scratch.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)
    for so in (ROOT / "fused_margin").glob("_C*.so"):  # the built extension (ignored by git)
        shutil.copy2(so, copy / "fused_margin" / so.name)
    _git(copy, "init", "-q")
    _git(copy, "add", "-A")
    _git(copy, "commit", "-q", "-m", "copy")
    assert _git(copy, "status", "--porcelain", "--ignored=no") == ""

    env = dict(os.environ, PYTHONPATH=str(copy), MPLBACKEND="Agg")
    for cmd in readme_example_commands():
        argv = shlex.split(cmd.replace("/tmp/", f"{scratch}/"))
        assert argv[0] == "fused-margin"
        proc = subprocess.run([sys.executable, "-m", "fused_margin.cli", *argv[1:]], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    status = _git(copy, "status", "--porcelain")
    assert status == "", f"README commands changed the tree:\n{status}"
    assert any(scratch.iterdir())  # they did write, elsewhere
