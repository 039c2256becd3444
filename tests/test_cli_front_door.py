"""The command line's front door: margin bounds of every kind as one line and exit
2, a library ValueError as one line, missing extras named before any work, the
backends table, reproduce's guard on hand-edited reports, the plots, and which
losses report an important class."""
import json
import sys

import pytest

import fused_margin as fm
from fused_margin import cli
from fused_margin.cli import reproduce as R
from fused_margin.cli.train import DEFAULT_MARGIN, IMPORTANT_LOSSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# every loss with a --margin, a value past its bound, and what the message must (not) say
MARGIN_BOUNDS = {
    "arcface": ["5", "2", "-0.1"],
    "camri": ["5", "1.6", "-1"],
    "combined": ["1.6", "5", "-0.5"],
    "sphereface": ["0.5", "0", "-1"],
    "cosface": ["-0.1"],
    "ldam": ["-0.5"],
    "elm": ["-0.5"],
    "msoftmax": ["-0.1"],
    "subcenter-arcface": ["5", "-0.1"],
    "elasticface": ["5", "-0.1"],
    "adaface": ["5", "-0.1"],
    "curricularface": ["5", "-0.1"],
}


def _one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_margin_loss_has_its_bound_tested():
    assert set(MARGIN_BOUNDS) == set(DEFAULT_MARGIN)


@pytest.mark.parametrize("loss,margin", [(loss, m) for loss, ms in MARGIN_BOUNDS.items()
                                         for m in ms])
def test_margin_out_of_bounds_is_one_line_exit_2(capsys, loss, margin):
    err = _one_line_exit_2(capsys, ["train", "-q", "--dataset", "iris", "--epochs", "1",
                                    "--loss", loss, "--margin", margin])
    assert err.startswith("fused-margin train: error: ")
    if loss != "arcface":
        assert "arcface" not in err.replace(loss, ""), err  # camri's message names camri


def test_a_library_value_error_is_one_line_exit_2(capsys, monkeypatch):
    from fused_margin.cli import train as T

    def bad(*a, **k):
        raise ValueError("arcface margins must lie in [-pi/2, pi/2], got [0.0, 5.0]\nmore")
    monkeypatch.setattr(T, "train", bad)
    err = _one_line_exit_2(capsys, ["train", "-q", "--dataset", "iris"])
    assert "pi/2" in err


@pytest.mark.parametrize("argv,module", [
    (["train", "-q", "--dataset", "iris", "--epochs", "1"], "sklearn"),
    (["train", "-q", "--dataset", "iris", "--epochs", "1", "--plot", "{tmp}/f.png"],
     "matplotlib"),
    (["bench", "--quick", "--ops", "soft_nn", "--plot", "{tmp}/b.png"], "matplotlib"),
    (["reproduce", "--quick", "--claims", "a", "--out", "{tmp}/rep"], "matplotlib"),
    (["reproduce", "--quick", "--claims", "a"], "sklearn"),
])
def test_missing_extra_is_named_before_any_work(capsys, monkeypatch, tmp_path, argv, module):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    from fused_margin.cli import bench as B
    from fused_margin.cli import train as T

    def no_work(*a, **k):
        raise AssertionError("work started before the dependency check")
    for mod, name in ((T, "train"), (B, "run"), (R, "run")):
        monkeypatch.setattr(mod, name, no_work)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "fused_margin[cli]"' in err, err
    assert not (tmp_path / "rep").exists()


def test_backends_is_a_dict_whose_repr_is_the_table(capsys):
    info = fm.backends()
    assert isinstance(info, dict) and info["reference"]["available"] is True
    table = repr(info)
    assert table == str(info)
    assert table.splitlines()[0].split() == ["backend", "available", "reason"]
    for op in fm.dispatch.OPS:
        assert any(line.startswith(op + " ") for line in table.splitlines()), op
    assert json.loads(json.dumps(info)) == dict(info)
    assert cli.main(["backends"]) == 0
    assert capsys.readouterr().out.strip() == table


def test_reproduce_refuses_a_hand_edited_report(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "reproduce.md").write_text("# my notes\n")
    err = _one_line_exit_2(capsys, ["reproduce", "--quick", "--claims", "b", "-q",
                                    "--out", str(out)])
    assert "--force" in err and (out / "reproduce.md").read_text() == "# my notes\n"


def test_reproduce_stamp_round_trip(tmp_path):
    res = R.ClaimResult(key="b", title="ELM beats LDAM", paper="p", setting="s", measure="m",
                        runs={"ldam": {"accuracy": [0.5, 0.6]},
                              "elm": {"accuracy": [0.6, 0.7]}})
    res.comparisons = [R.Comparison("accuracy", "elm", "ldam", "accuracy", [0.1, 0.1])]
    res.verdict = res.comparisons[0].verdict()
    path = R.write_report([res], str(tmp_path), seeds=2, quick=False, total_s=1.0)
    assert R.hand_edited(path) is None  # ours: may be overwritten
    with open(path, "a") as f:
        f.write("a hand-written section\n")
    assert "by hand" in R.hand_edited(path)
    text = open(path).read().replace("ELM beats LDAM", "ELM beats LDAM (edited)", 1)
    open(path, "w").write(text.replace("a hand-written section\n", ""))
    assert "by hand" in R.hand_edited(path)
    png = (tmp_path / "reproduce_b.png").read_bytes()
    assert png[:8] == PNG_MAGIC


def test_bench_plot_without_margin_ce_plots_what_ran(tmp_path, capsys):
    from fused_margin.cli import bench as B

    report = {"machine": {"device": "cpu", "cpu_count": 2, "torch_threads": 1},
              "settings": {"threads": 1},
              "results": [dict(op="soft_nn", shape={"N": 8, "D": 4, "C": 2}, provider=p,
                               status="ok", min_ms=t, median_ms=t, peak_mb=1.0)
                          for p, t in (("eager", 2.0), ("cpu", 1.0))]}
    assert B.plot(report, str(tmp_path / "a.png")) is None
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    for r in report["results"]:
        r["status"] = "n/a"
    why = B.plot(report, str(tmp_path / "b.png"))
    assert "nothing to plot" in why and not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("loss", ["arcface", "camri"])
def test_important_class_recall_only_for_losses_that_have_one(capsys, loss):
    assert cli.main(["train", "-q", "--dataset", "iris", "--epochs", "1", "--loss", loss]) == 0
    out = capsys.readouterr().out
    assert ("important class" in out) == (loss in IMPORTANT_LOSSES)
