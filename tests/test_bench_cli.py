"""`fused-margin bench` and `fused-margin reproduce`: the outputs they promise, bad input.

In process, the smallest settings: `bench --quick` on cheap ops (each
measurement still runs in its own process) and `reproduce --quick` on claim
(a) (one seed, 3 epochs). Nothing asserts on time.
"""
import json
import math

import pytest
import torch

from fused_margin import cli, dispatch
from fused_margin.cli import bench, reproduce

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {"op", "shape", "provider", "status", "reason", "mode", "min_ms", "median_ms",
               "peak_mb", "repeats", "calls_per_repeat", "floor", "wall_s"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    js, png = d / "bench.json", d / "bench.png"
    code = cli.main(["bench", "--quick", "--ops", "margin_ce:cosface,sinkhorn",
                     "--json", str(js), "--plot", str(png)])
    return code, json.loads(js.read_text()), png


def test_bench_json_fields(bench_run):
    code, rep, _ = bench_run
    assert code == 0
    assert {"date", "machine", "settings", "backends", "results"} <= set(rep)
    assert rep["machine"]["device"] == "cpu"
    assert rep["settings"]["quick"] is True and rep["settings"]["threads"] == 1
    rows = rep["results"]
    assert all(set(r) == RESULT_KEYS for r in rows)
    got = {(r["op"], r["provider"]) for r in rows}
    want = {(op, p) for op in ("margin_ce:cosface", "sinkhorn")
            for p in ("eager", "compile", "cpu", "floor")}
    assert got == want
    for r in rows:
        if r["status"] == "ok":
            assert 0 < r["min_ms"] <= r["median_ms"] and math.isfinite(r["median_ms"])
            assert r["peak_mb"] >= 0 and r["repeats"] == bench.REPEATS["quick"][1]
        else:
            assert r["status"] == "n/a" and r["reason"] and r["min_ms"] is None


def test_bench_reports_missing_kernels_as_na(bench_run):
    _, rep, _ = bench_run
    by = {(r["op"], r["provider"]): r for r in rep["results"]}
    assert by[("margin_ce:cosface", "eager")]["status"] == "ok"
    assert by[("margin_ce:cosface", "floor")]["status"] == "ok"
    assert by[("margin_ce:cosface", "floor")]["floor"] == "x@W.T, G@W, G.T@x"
    assert by[("sinkhorn", "floor")]["status"] == "n/a"
    assert "skipped by --quick" in by[("sinkhorn", "compile")]["reason"]
    for op, family in (("margin_ce:cosface", "margin_cross_entropy"), ("sinkhorn", "sinkhorn")):
        row = by[(op, "cpu")]
        runs_here = "cpu" in dispatch.OPS[family] and dispatch._status("cpu")[0]
        # a missing kernel is n/a, never the reference timed under the cpu name
        assert (row["status"] == "ok") == runs_here, row["reason"]


def test_bench_plot_and_table(bench_run, capsys):
    _, rep, png = bench_run
    assert png.read_bytes()[:8] == PNG_MAGIC
    table = bench.markdown(rep)
    assert table.count("\n") == len(rep["results"]) + 1
    assert "| sinkhorn |" in table and "n/a" in table


def test_bench_cases_cover_every_op():
    cases = bench.build_cases(bench.parse_ops(None), quick=True)
    assert {c.op for c in cases} == set(bench.OPS)
    sweep = [c.shape["C"] for c in cases if c.op == f"margin_ce:{bench.SWEEP_KIND}"]
    assert len(sweep) >= 2  # the plot needs a line, not a point
    assert bench.parse_ops("margin_ce") == [f"margin_ce:{k}" for k in bench.MARGIN_KINDS]
    assert bench.parse_ops("elm, knn_std") == ["margin_ce:elm", "knn_std"]


def test_bench_hung_measurement_is_na_not_waited_on():
    import multiprocessing as mp

    case = bench.build_cases(["knn_std"], quick=True)[0]
    row = bench._in_child(mp.get_context("forkserver"), case, "eager", (1, 3, 1), timeout=0.01)
    assert row["status"] == "n/a" and "timed out" in row["reason"]


@pytest.mark.parametrize("op", ["knn_std", "soft_nn", "triplet", "sinkhorn", "margin_ce:elm"])
def test_bench_steps_run_and_backpropagate(op):
    case = bench.build_cases([op], quick=True)[0]
    leaves, call = bench._inputs(case, torch.device("cpu"), torch.float32)
    out = call(bench._impl(case, "eager"))
    out.backward()
    assert out.dim() == 0 and bool(torch.isfinite(out))
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in leaves)


def test_reproduce_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "rep"
    js = tmp_path / "rep.json"
    code = cli.main(["reproduce", "--quick", "--quiet", "--claims", "a", "--out", str(out),
                     "--json", str(js)])
    assert code == 0
    text = (out / "reproduce.md").read_text()
    assert "## (a)" in text and "**Verdict:**" in text and "inconclusive: one seed" in text
    assert "![claim a](reproduce_a.png)" in text
    assert (out / "reproduce_a.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads(js.read_text())
    assert [d["key"] for d in data] == ["a"]
    runs = data[0]["runs"]
    assert set(runs) == {"ce", "normface", "camri"}
    for metrics in runs.values():
        assert len(metrics["accuracy"]) == 1 and 0 <= metrics["accuracy"][0] <= 1
    assert "(a) CAMRI" in capsys.readouterr().out


@pytest.mark.parametrize("diffs,kind,verdict", [
    ([0.02, 0.03, 0.025], "beats", "reproduces"),
    ([-0.02, -0.03, -0.025], "beats", "does not reproduce (reversed)"),
    ([0.05, -0.04, 0.01], "beats", "inconclusive: spread overlaps"),
    ([0.01], "beats", "inconclusive: one seed"),
    ([-0.001, 0.002, -0.002], "keeps", "kept"),
    ([-0.03, -0.02, -0.025], "keeps", "lost"),
    ([-0.008, -0.009, -0.007], "keeps", "lost"),  # small but on every seed
    ([0.0, 0.0, 0.0], "keeps", "kept"),
    ([0.012, -0.02, -0.012], "keeps", "kept"),  # mean drop 0.67 pts, within the spread
    # a large mean drop hidden by a larger spread (sigma2r's -5.6 +- 8.0 pts) is not kept
    ([0.03, -0.14, -0.06], "keeps", "inconclusive: lower on 2 of 3 seeds"),
    ([0.01], "keeps", "inconclusive: one seed"),
])
def test_verdict_rule(diffs, kind, verdict):
    assert reproduce.Comparison("x", "A", "B", "accuracy", diffs, kind).verdict() == verdict


@pytest.mark.parametrize("acc,verdict", [
    ([0.001, -0.002, 0.0], "reproduces"),
    ([-0.03, -0.02, -0.025], "does not reproduce (accuracy lost)"),
    ([0.03, -0.14, -0.06], "recall reproduces, accuracy inconclusive: lower on 2 of 3 seeds"),
])
def test_claim_a_needs_the_accuracy_kept(acc, verdict):
    rec = reproduce.Comparison("r", "camri", "ce", "important_recall", [0.05, 0.06, 0.04])
    keep = reproduce.Comparison("a", "camri", "ce", "accuracy", acc, "keeps")
    assert reproduce.recall_and_accuracy_verdict(rec, keep) == verdict


def test_intra_class_eq12_matches_formula():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0], [10.0, 14.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    m = reproduce.intra_class_eq12(x, y)
    # class 0: mu (1, 0), sum of squares 2, n - 1 = 1; class 1: mu (10, 12), 8 / 2
    assert m["per_class"] == pytest.approx([math.sqrt(2.0), 2.0])
    assert m["mean"] == pytest.approx((math.sqrt(2.0) + 2.0) / 2)
    assert m["relative"] == pytest.approx(m["mean"] / math.hypot(9.0, 12.0))


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--ops", "nope"], "unknown op 'nope'"),
    (["bench", "--device", "meta"], "device must be cpu or cuda"),
    (["bench", "--json", "/no/such/dir/x.json"], "does not exist"),
    (["bench", "--threads", "0"], "--threads must be an integer in 1.."),
    (["bench", "--threads", "100000"], "--threads must be an integer in 1.."),
    (["reproduce", "--claims", "a,z"], "unknown claim 'z'"),
    (["reproduce", "--seeds", "0"], "--seeds must be a positive integer"),
    (["reproduce", "--seeds", "two"], "not an integer"),
    (["reproduce", "--out", "/no/such/dir/sub"], "not a writable directory"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err

