"""`fused-margin train`: every loss end to end, the report, the plot, bad input.

Runs `main([...])` in-process on iris (3 classes, 112 training samples) with
one or two epochs, so the whole file stays well under a minute on 2 cores.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_margin import cli
from fused_margin.cli.data import DataError, load_split, long_tail_counts
from fused_margin.cli.train import LOSSES, angle_statistics, classification_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANGLE_ATOL = 1e-6  # degrees, float64 metrics on exact geometry


def run_train(tmp_path, *args, name="report.json"):
    path = tmp_path / name
    code = cli.main(["train", "--quiet", "--json", str(path), *args])
    assert code == 0
    return json.loads(path.read_text())


def check_report(rep, *, epochs):
    ds = rep["dataset"]
    c, n_test = ds["num_classes"], ds["test_size"]
    assert 0.0 <= rep["accuracy"] <= 1.0
    recall = rep["per_class_recall"]
    assert len(recall) == c and all(0.0 <= r <= 1.0 for r in recall)
    cm = torch.tensor(rep["confusion_matrix"])
    assert cm.shape == (c, c) and bool((cm >= 0).all())
    assert int(cm.sum()) == n_test
    assert cm.sum(1).tolist() == ds["test_counts"]
    assert math.isclose(rep["accuracy"], float(cm.trace()) / n_test)
    for j in range(c):
        assert math.isclose(recall[j], float(cm[j, j]) / ds["test_counts"][j])
    assert rep["important_recall"] == recall[rep["important_class"]]
    ang = rep["angles"]
    assert len(ang["target_mean_deg"]) == c and len(ang["target_std_deg"]) == c
    assert all(0.0 <= a <= 180.0 for a in ang["target_mean_deg"])
    assert all(0.0 <= a <= 180.0 for a in ang["target_std_deg"])
    for key in ("wc_intra_deg", "w_inter_deg", "c_inter_deg"):
        assert 0.0 <= ang[key] <= 180.0, key
    tm = rep["timing"]
    assert len(tm["epoch_s"]) == epochs and all(t > 0 for t in tm["epoch_s"])
    assert math.isclose(tm["train_s"], sum(tm["epoch_s"]))
    assert tm["total_s"] >= tm["train_s"]
    assert len(rep["train_loss"]) == epochs and all(math.isfinite(v) for v in rep["train_loss"])
    assert sum(ds["train_counts"]) == ds["train_size"]


# ------------------------------------------------------------------ every loss

@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_reports(tmp_path, capsys, loss):
    rep = run_train(tmp_path, "--loss", loss, "--dataset", "iris", "--epochs", "2",
                    "--important-class", "1")
    check_report(rep, epochs=2)
    assert rep["loss"]["name"] == loss and rep["important_class"] == 1
    assert rep["dataset"]["num_classes"] == 3 and rep["dataset"]["test_size"] == 38
    out = capsys.readouterr().out
    assert f"{loss} on iris" in out and "accuracy" in out and "WC-Intra" in out


def test_default_loss_learns_iris(tmp_path):
    rep = run_train(tmp_path, "--dataset", "iris", "--epochs", "15")
    assert rep["loss"]["name"] == "arcface"
    assert rep["loss"]["params"] == {"s": 16.0, "m": 0.3}
    assert rep["accuracy"] > 0.85
    assert rep["train_loss"][-1] < rep["train_loss"][0]


def test_same_seed_same_result(tmp_path):
    args = ("--loss", "cosface", "--dataset", "wine", "--epochs", "2", "--seed", "3")
    a = run_train(tmp_path, *args, name="a.json")
    b = run_train(tmp_path, *args, name="b.json")
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["train_loss"] == b["train_loss"]


def test_arcgrad_scale_follows_gap(tmp_path):
    import fused_margin

    rep = run_train(tmp_path, "--loss", "arcgrad", "--dataset", "iris", "--epochs", "1",
                    "--gap", "0.3")
    assert math.isclose(rep["loss"]["params"]["s"], fused_margin.arcgrad_scale(3, 0.3))


def test_drw_starts_in_the_second_half(tmp_path):
    rep = run_train(tmp_path, "--loss", "ldam", "--drw", "--dataset", "iris", "--epochs", "3",
                    "--imbalance", "5")
    assert rep["loss"]["drw_start_epoch"] == 1
    assert run_train(tmp_path, "--loss", "ce", "--dataset", "iris",
                     "--epochs", "1")["loss"]["drw_start_epoch"] is None


def _skip_unavailable(backend):
    import fused_margin

    info = fused_margin.backends()[backend]
    if not info["available"]:
        pytest.skip(info["reason"])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_backend_choice_is_reported(tmp_path, backend):
    _skip_unavailable(backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    rep = run_train(tmp_path, "--loss", "cosface", "--dataset", "iris", "--epochs", "1",
                    "--backend", backend, "--device", device)
    used = rep["loss"]["backends"]
    assert used["margin_cross_entropy"] == backend
    # ops the backend has no kernel for run the reference instead of failing
    assert set(used.values()) <= {backend, "reference"}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_adacos_mixes_backends(tmp_path, backend):
    _skip_unavailable(backend)
    rep = run_train(tmp_path, "--loss", "adacos", "--dataset", "iris", "--epochs", "2",
                    "--backend", backend)
    used = rep["loss"]["backends"]
    assert used["margin_cross_entropy"] == backend
    assert used["adacos_loss"] in {backend, "reference"}
    s0 = math.sqrt(2) * math.log(2)
    assert rep["loss"]["final_scale"] != pytest.approx(s0)  # the scale adapted


# ------------------------------------------------------------------ data

def test_imbalance_shrinks_the_tail(tmp_path):
    base = run_train(tmp_path, "--loss", "ce", "--epochs", "1", name="base.json")
    tail = run_train(tmp_path, "--loss", "ce", "--epochs", "1", "--imbalance", "10",
                     name="tail.json")
    b, t = base["dataset"], tail["dataset"]
    assert t["test_counts"] == b["test_counts"]  # the test split stays balanced
    counts = t["train_counts"]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == b["train_counts"][0]
    assert all(tc <= bc for tc, bc in zip(counts, b["train_counts"]))
    assert counts[-1] == max(b["train_counts"]) // 10
    assert t["train_size"] < b["train_size"] and t["imbalance"] == 10


def test_long_tail_profile():
    assert long_tail_counts([100, 100, 100], 4.0) == [100, 50, 25]
    assert long_tail_counts([100, 30, 100], 4.0) == [100, 30, 25]  # capped by what exists
    assert long_tail_counts([10, 10], 1000.0) == [10, 1]  # never empty
    with pytest.raises(ValueError):
        long_tail_counts([10, 10], 0.5)


def test_split_is_standardised_and_stratified():
    s = load_split("wine", seed=0)
    assert torch.allclose(s.x_train.mean(0), torch.zeros(s.num_features), atol=1e-5)
    assert torch.allclose(s.x_train.std(0, unbiased=False), torch.ones(s.num_features),
                          atol=1e-4)
    frac = torch.tensor(s.test_counts, dtype=torch.float64) / sum(s.test_counts)
    full = torch.tensor(s.train_counts, dtype=torch.float64) + torch.tensor(s.test_counts)
    assert torch.allclose(frac, full / full.sum(), atol=0.02)


# ------------------------------------------------------------------ metrics

def test_angle_statistics_on_exact_geometry():
    w = torch.eye(3, 4) * torch.tensor([[2.0], [0.5], [1.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    feats = w[labels] * torch.tensor([[1.0], [3.0], [2.0], [0.1], [5.0]])
    st = angle_statistics(feats, labels, w)
    assert st["target_mean_deg"] == pytest.approx([0.0] * 3, abs=ANGLE_ATOL)
    assert st["target_std_deg"] == pytest.approx([0.0] * 3, abs=ANGLE_ATOL)
    assert st["wc_intra_deg"] == pytest.approx(0.0, abs=ANGLE_ATOL)
    assert st["w_inter_deg"] == pytest.approx(90.0, abs=ANGLE_ATOL)
    assert st["c_inter_deg"] == pytest.approx(90.0, abs=ANGLE_ATOL)
    # class 0 at +-45 degrees from its weight: mean 45, std 0; its centre lies on W_0
    feats2 = torch.tensor([[1.0, 1.0, 0, 0], [1.0, -1.0, 0, 0]])
    st2 = angle_statistics(feats2, torch.tensor([0, 0]), w)
    assert st2["target_mean_deg"][0] == pytest.approx(45.0, abs=ANGLE_ATOL)
    assert st2["target_std_deg"][0] == pytest.approx(0.0, abs=ANGLE_ATOL)
    assert st2["target_mean_deg"][1] is None


def test_classification_metrics():
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    m = classification_metrics(pred, labels, 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class_recall"] == pytest.approx([0.5, 1.0, 0.0])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


# ------------------------------------------------------------------ plot

@pytest.mark.parametrize("dim", [1, 2, 8])
def test_plot_is_a_png(tmp_path, dim):
    png = tmp_path / "features.png"
    assert cli.main(["train", "--quiet", "--dataset", "iris", "--epochs", "1",
                     "--embedding-dim", str(dim), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


# ------------------------------------------------------------------ bad input

BAD_INPUTS = {
    "unknown loss": ["--loss", "nope"],
    "unknown dataset": ["--dataset", "mnist"],
    "class out of range": ["--dataset", "iris", "--important-class", "3"],
    "negative class": ["--important-class", "-1"],
    "zero epochs": ["--epochs", "0"],
    "negative epochs": ["--epochs", "-2"],
    "non-integer epochs": ["--epochs", "2.5"],
    "nan lr": ["--lr", "nan"],
    "negative lr": ["--lr", "-0.1"],
    "zero batch": ["--batch-size", "0"],
    "imbalance below 1": ["--imbalance", "0.5"],
    "zero scale": ["--scale", "0"],
    "negative margin": ["--margin", "-0.1"],
    "scale without one": ["--loss", "ce", "--scale", "8"],
    "adacos scale": ["--loss", "adacos", "--scale", "8"],
    "sphereface m < 1": ["--loss", "sphereface", "--margin", "0.5"],
    "drw on arcface": ["--drw"],
    "adacos on 2 classes": ["--loss", "adacos", "--dataset", "breast_cancer"],
    "unknown backend": ["--backend", "gpu"],
    "bad device": ["--device", "tpu"],
    "missing json dir": ["--json", "/nonexistent-dir/x/report.json"],
    "test size": ["--test-size", "1.5"],
    "test split without every class": ["--test-size", "0.001"],
    "train split without every class": ["--test-size", "0.999"],
    "iris test split too small": ["--dataset", "iris", "--test-size", "0.01"],
    "zero threads": ["--threads", "0"],
    "absurd threads": ["--threads", "100000"],
    "model larger than memory": ["--hidden-dim", "10000000000"],
    "embedding larger than memory": ["--embedding-dim", "10000000000"],
}


@pytest.mark.parametrize("args", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(capsys, args):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--quiet", "--epochs", "1", *args])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("fused-margin") and "error:" in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("name,bad", [("iris", 0.01), ("iris", 0.99), ("digits", 0.001),
                                      ("wine", 0.999)])
def test_test_size_error_names_a_range_that_works(name, bad):
    with pytest.raises(DataError, match=r"use a test-size in \[") as exc:
        load_split(name, test_size=bad)
    lo, hi = (float(v) for v in str(exc.value).rsplit("[", 1)[1].rstrip("]").split(", "))
    for ok in (lo, hi):  # both ends split, with every class on both sides
        s = load_split(name, test_size=ok)
        assert min(s.train_counts) >= 1 and min(s.test_counts) >= 1


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 160000000000 bytes.\nmore")])
def test_allocation_failure_exits_2_with_one_line(monkeypatch, capsys, exc):
    from fused_margin.cli import train as T

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(T, "train", fail)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--hidden-dim" in err and err.count("\n") == 1


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    from fused_margin.cli import train as T

    def fail(*a, **k):
        raise RuntimeError("a kernel bug")
    monkeypatch.setattr(T, "train", fail)
    with pytest.raises(RuntimeError, match="a kernel bug"):
        cli.main(["train", "--quiet"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--quiet", "--device", "cuda"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_no_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_documents_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for loss in LOSSES:
        assert loss in out
    assert "arcgrad_scale" in out and "s=16" in out


# ------------------------------------------------------------------ console script

def test_console_script(tmp_path):
    exe = Path(sys.executable).with_name("fused-margin")
    script = str(exe) if exe.exists() else shutil.which("fused-margin")
    if script is None:
        pytest.skip("the fused-margin console script is not installed")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([script, "train", "--loss", "arcface", "--dataset", "iris",
                           "--epochs", "2"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "arcface on iris" in proc.stdout and "accuracy" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_progress_bar_goes_to_stderr(capsys):
    from fused_margin.cli.train import TrainConfig, train

    train(TrainConfig(loss="ce", dataset="iris", epochs=2), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "epoch" in err and "ce/iris" in err
