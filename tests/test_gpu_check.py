"""bench/gpu_check.sh's CPU-runnable parts: argument parsing and the --dry-run driver
(tiny shapes, the Triton interpreter), so that the GPU run's script is known to work
before a GPU session spends time on it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_usage_without_outdir():
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "usage" in proc.stderr


def test_dry_run_writes_json_and_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    got = {r["provider"]: r for r in rows}
    for prov in ("fused", "eager", "floor"):
        assert "ms" in got[prov], got[prov]
    assert all("error" in got[p] for p in ("compile", "torch", "cce", "liger"))
    lin = {r["provider"]: r for r in json.load(open(tmp_path / "linear.json"))["rows"]}
    for prov in ("fused", "eager", "floor"):
        assert "ms" in lin[prov], lin[prov]
    assert "plain linear cross-entropy" in (tmp_path / "table.md").read_text()
    sweep = json.load(open(tmp_path / "sweep.json"))["rows"]
    assert sweep and all("ms" in r for r in sweep), sweep
    assert "| fused |" in (tmp_path / "table.md").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("|")  # the table is printed last


@pytest.mark.parametrize("argv", [["bench", "--dry-run"], ["sweep", "--dry-run"]])
def test_driver_arguments(argv):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    a = gpu_check.parse_args(argv)
    assert (a.n, a.d, a.c) == (32, 16, [130])
