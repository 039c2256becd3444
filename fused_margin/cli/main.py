"""The `fused-margin` command line: parse, call the library, print.

Subcommands register themselves in COMMANDS (name -> (add_parser, run)); the
training work lives in fused_margin.cli.train. Bad input exits with status 2 and
one line on stderr, never a traceback; so does any ValueError of the library's
input checks. A missing optional dependency (scikit-learn, matplotlib, tqdm)
is one line naming `pip install "fused_margin[cli]"`, before any work starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

PROG = "fused-margin"


class UsageError(Exception):
    """Bad input found after parsing: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2 as usual."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


# ------------------------------------------------------------------ train

def _train_epilog() -> str:
    from . import train as T

    rows = [
        ("ce", "softmax cross-entropy on a linear head (--drw: deferred re-weighting)"),
        ("normface", f"s={T.DEFAULT_SCALE['normface']:g}"),
        ("arcface", f"s={T.DEFAULT_SCALE['arcface']:g} m={T.DEFAULT_MARGIN['arcface']:g} "
                    "(additive angle, rad)"),
        ("cosface", f"s={T.DEFAULT_SCALE['cosface']:g} m={T.DEFAULT_MARGIN['cosface']:g} "
                    "(additive cosine)"),
        ("sphereface", f"s={T.DEFAULT_SCALE['sphereface']:g} "
                       f"m={T.DEFAULT_MARGIN['sphereface']:g} (multiplicative, >= 1)"),
        ("combined", f"s={T.DEFAULT_SCALE['combined']:g} m1={T.COMBINED_M1:g} "
                     f"m2=--margin={T.DEFAULT_MARGIN['combined']:g} m3={T.COMBINED_M3:g}"),
        ("camri", f"s={T.DEFAULT_SCALE['camri']:g} m={T.DEFAULT_MARGIN['camri']:g} on "
                  "--important-class only"),
        ("arcgrad", f"s=arcgrad_scale(C, --gap={T.ARCGRAD_GAP:g} rad), e.g. 14.3 for C=10"),
        ("adacos", "adaptive s from sqrt(2)*log(C-1); no --scale"),
        ("ldam", f"s={T.DEFAULT_SCALE['ldam']:g} max_m={T.DEFAULT_MARGIN['ldam']:g} "
                 "(per-class margins from the train counts; --drw)"),
        ("elm", f"s={T.DEFAULT_SCALE['elm']:g} max_m={T.DEFAULT_MARGIN['elm']:g} "
                f"lambda={T.ELM_LAMBDA:g} (--drw)"),
        ("msoftmax", f"m={T.DEFAULT_MARGIN['msoftmax']:g} (M-Softmax: linear head with bias, "
                     "target logit lowered by m)"),
        ("wce", "linear head; class weight --important-weight on --important-class, 1 elsewhere"),
        ("crwwce", "linear head; fn[K]=--important-weight, fp rows/cols of K = "
                   f"{T.CRWWCE_FP_IMPORTANT:g}, diagonal 0, others 1"),
        ("wasserstein", f"linear head; cost 1 - eye with the row and column of K = "
                        f"{T.WASSERSTEIN_IMPORTANT:g} (eps={T.SINKHORN_EPS:g}, "
                        f"{T.SINKHORN_ITERS} Sinkhorn iterations)"),
        ("center, contrastive-center, sigma2r, soft-nn, triplet, git, triplet-center, "
         "contrastive",
         "CE on a linear head + --lambda x the feature-space loss on the embedding"),
    ]
    width = 12
    lines = ["per-loss defaults (override with --scale / --margin):"]
    for name, text in rows:
        if len(name) > width:
            lines.append(f"  {name}:")
            lines.append(f"  {'':{width}}  {text}")
        else:
            lines.append(f"  {name:{width}}  {text}")
    lines += [
        "",
        "prediction is argmax of s*cos(x, W_j) (no margin) for the margin losses and of the",
        "linear logits otherwise. Angle statistics (degrees, on the test split) use the loss's",
        "class weights W, or the linear head's weight rows: per-class mean/std of the target",
        "angle, and ArcGrad's WC-Intra, W-Inter, C-Inter.",
        "",
        "example: fused-margin train --loss camri --dataset digits --important-class 3 "
        "--plot camri.png",
    ]
    return "\n".join(lines)


def _add_train(sub) -> argparse.ArgumentParser:
    from .data import DATASETS
    from ..dispatch import BACKENDS
    from .train import ARCGRAD_GAP, LOSSES

    p = sub.add_parser(
        "train", help="train a small model with any loss on a bundled dataset and report",
        description="Train a small MLP embedding (input -> hidden -> ReLU -> embedding) with "
                    "one loss on a bundled scikit-learn dataset, then report test accuracy, "
                    "per-class recall, the confusion matrix, angle statistics and timings.",
        epilog=_train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="arcface", choices=LOSSES, metavar="NAME",
                   help=f"one of: {', '.join(LOSSES)} (default: arcface)")
    g.add_argument("--scale", type=_float, default=None, metavar="S",
                   help="the scale s of the margin losses (default: per loss, see below)")
    g.add_argument("--margin", type=_float, default=None, metavar="M",
                   help="the margin m (max_m for ldam/elm, m2 for combined; default: per loss)")
    g.add_argument("--gap", type=_float, default=ARCGRAD_GAP, metavar="RAD",
                   help=f"arcgrad: the angular gap in radians that sets s "
                        f"(default: {ARCGRAD_GAP:g})")
    g.add_argument("--lambda", dest="lam", type=_float, default=0.01, metavar="L",
                   help="weight of the feature-space loss added to CE (default: 0.01)")
    g.add_argument("--drw", action="store_true",
                   help="ce/ldam/elm: deferred re-weighting, class-balanced weights "
                        "(drw_weights) from the second half of the epochs")
    g.add_argument("--important-class", type=_int, default=0, metavar="K",
                   help="the important class for camri/wce/crwwce/wasserstein and the "
                        "reported important-class recall (default: 0)")
    g.add_argument("--important-weight", type=_float, default=4.0, metavar="W",
                   help="wce: class weight of K; crwwce: fn weight of K (default: 4)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                   help=f"one of: {', '.join(DATASETS)} (default: digits)")
    g.add_argument("--imbalance", type=_float, default=None, metavar="R",
                   help="long-tailed training split, n_c = n_max * R^(-c/(C-1)); the test "
                        "split stays balanced")
    g.add_argument("--test-size", type=_float, default=0.25, metavar="F",
                   help="stratified test fraction (default: 0.25)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_int, default=30, help="(default: 30)")
    g.add_argument("--batch-size", type=_int, default=64, help="(default: 64)")
    g.add_argument("--lr", type=_float, default=1e-2, help="Adam learning rate (default: 0.01)")
    g.add_argument("--embedding-dim", type=_int, default=32, metavar="D",
                   help="embedding size (default: 32; 2 plots the raw features)")
    g.add_argument("--hidden-dim", type=_int, default=64, metavar="H",
                   help="hidden layer width (default: 64)")
    g.add_argument("--seed", type=_int, default=0, help="split, initialisation and shuffling "
                                                        "seed (default: 0)")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="fused_margin backend (default: auto); ops without a kernel on the "
                        "chosen backend run the reference, and the report says which ran")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--threads", type=_int, default=1,
                   help="torch intra-op threads while training, 1 to 4 x the CPUs "
                        "(default: 1; the model is tiny)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    g.add_argument("--plot", metavar="PATH",
                   help="write a PNG of the test features with the class weight directions "
                        "(--embedding-dim 2: as is; 1: a strip per class; wider: PCA)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def _check_output(flag: str, path: Optional[str]) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path!r}: directory {parent!r} is not writable")


EXTRA_HINT = 'pip install "fused_margin[cli]"'


def _require(*needs: Tuple[str, str, str]) -> None:
    """Each (module, distribution, what for) must import, else one line naming the
    extra to install: checked before any work starts."""
    import importlib

    for module, dist, why in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(f"{dist} is not installed ({why}); {EXTRA_HINT}") from None


class MissingExtra(Exception):
    """An optional dependency of the command line is missing: one line, exit status 1."""


SKLEARN = ("sklearn", "scikit-learn", "the bundled datasets")
MATPLOTLIB = ("matplotlib", "matplotlib", "--plot")
TQDM = ("tqdm", "tqdm", "the progress bar; -q runs without it")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()  # torch's CPU allocator and CUDA OOM are RuntimeErrors
    return "out of memory" in text or "can't allocate memory" in text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else exc.__class__.__name__)[:200]


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def format_train_summary(report: dict) -> str:
    """The compact human-readable summary of a train report."""
    ds, loss, ang, tm = report["dataset"], report["loss"], report["angles"], report["timing"]
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in loss["params"].items())
    if loss["name"] == "adacos" and loss["final_scale"] is not None:
        params = (params + " " if params else "") + f"s(final)={loss['final_scale']:.3g}"
    ran = sorted(set(loss["backends"].values()))
    imb = f", imbalance {ds['imbalance']:g}" if ds["imbalance"] else ""
    out = [f"{loss['name']} on {ds['name']}: {ds['num_classes']} classes, {ds['train_size']} "
           f"train / {ds['test_size']} test{imb}; {params or 'no parameters'}; "
           f"backend {'/'.join(ran)} on {loss['device']}"
           + (f"; DRW from epoch {loss['drw_start_epoch'] + 1}"
              if loss["drw_start_epoch"] is not None else "")]
    from .train import IMPORTANT_LOSSES

    k = report["important_class"] if loss["name"] in IMPORTANT_LOSSES else None
    out.append(f"accuracy {report['accuracy']:.4f}" + (
        "" if k is None else f"   important class {k} ({ds['class_names'][k]}) recall "
                             f"{_fmt(report['important_recall'], '.4f')}"))
    name_w = max(5, max(len(str(n)) for n in ds["class_names"]))
    out.append(f"  {'class':>5} {'name':>{name_w}} {'train':>6} {'test':>5} {'recall':>7} "
               f"{'angle mean':>10} {'angle std':>9}")
    for j in range(ds["num_classes"]):
        mark = "*" if j == k else " "
        out.append(f"{mark} {j:>5} {str(ds['class_names'][j]):>{name_w}} "
                   f"{ds['train_counts'][j]:>6} {ds['test_counts'][j]:>5} "
                   f"{_fmt(report['per_class_recall'][j], '.4f'):>7} "
                   f"{_fmt(ang['target_mean_deg'][j], '.2f'):>10} "
                   f"{_fmt(ang['target_std_deg'][j], '.2f'):>9}")
    out.append(f"angles (deg): WC-Intra {_fmt(ang['wc_intra_deg'], '.2f')}  "
               f"W-Inter {_fmt(ang['w_inter_deg'], '.2f')}  "
               f"C-Inter {_fmt(ang['c_inter_deg'], '.2f')}")
    cm = report["confusion_matrix"]
    if len(cm) <= 10:
        w = max(3, len(str(max(max(r) for r in cm))))
        out.append("confusion (rows: true, columns: predicted):")
        out.append("      " + " ".join(f"{j:>{w}}" for j in range(len(cm))))
        for j, row in enumerate(cm):
            out.append(f"  {j:>3} " + " ".join(f"{v:>{w}}" for v in row))
    n_ep = len(tm["epoch_s"])
    out.append(f"time: {tm['mean_epoch_s'] * 1e3:.1f} ms/epoch over {n_ep} epochs, "
               f"{tm['train_s']:.2f} s training, {tm['total_s']:.2f} s in all; "
               f"final train loss {report['train_loss'][-1]:.4f}")
    return "\n".join(out)


def _run_train(args: argparse.Namespace) -> int:
    from . import train as T

    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    progress = not args.quiet and sys.stderr.isatty()
    _require(SKLEARN, *([MATPLOTLIB] if args.plot else []), *([TQDM] if progress else []))
    cfg = T.TrainConfig(
        loss=args.loss, dataset=args.dataset, imbalance=args.imbalance,
        important_class=args.important_class, important_weight=args.important_weight,
        backend=args.backend, device=args.device, seed=args.seed, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim, scale=args.scale, margin=args.margin, gap=args.gap,
        lam=args.lam, drw=args.drw, test_size=args.test_size, threads=args.threads)
    try:
        result = T.train(cfg, progress=progress)
    except T.ConfigError as exc:
        raise UsageError(str(exc)) from None
    except (MemoryError, RuntimeError) as exc:
        # train() refuses sizes its estimate says cannot fit; this catches the rest
        # (a device that is fuller than it looked), and only allocation failures
        if not _is_out_of_memory(exc):
            raise
        raise UsageError(f"out of memory ({_first_line(exc)}); try a smaller --hidden-dim, "
                         "--embedding-dim or --batch-size") from None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.report, f, indent=2)
            f.write("\n")
    if args.plot:
        T.plot_features(result, args.plot)
    print(format_train_summary(result.report))
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ bench

def _add_bench(sub) -> argparse.ArgumentParser:
    from .bench import OPS

    p = sub.add_parser(
        "bench", help="speed and peak memory of every op against eager PyTorch and the floor",
        description="Time (min and median of repeats, warm-up discarded) and peak memory of "
                    "each op, forward + backward, for eager PyTorch (backend=reference), "
                    "torch.compile of the reference, the fused backend of the device (cpu: "
                    "the C++ kernels; cuda: Triton) and the matmul floor. A backend without a "
                    "kernel for an op is reported as n/a with the reason. On CPU every "
                    "measurement runs in its own process and memory is its ru_maxrss growth.",
        epilog=f"ops: {', '.join(OPS)} (margin_ce selects every kind)\n"
               "example: fused-margin bench --quick --ops margin_ce:arcface,knn_std "
               "--json bench.json --plot bench.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", metavar="LIST", help="comma-separated ops (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, 3 repeats, no torch.compile: about a minute on 2 cores")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the reference (reported as n/a)")
    p.add_argument("--threads", type=_int, default=None,
                   help="torch intra-op threads while timing, 1 to 4 x the CPUs (default: 1 "
                        "with --quick, else torch's)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG: time and memory against C for margin CE (arcface) when "
                        "it ran, else bars of every op that ran")
    return p


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench as B

    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.plot:
        _require(MATPLOTLIB)
    if args.threads is not None:
        from .train import ConfigError, check_threads

        try:
            check_threads("--threads", args.threads)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    try:
        ops = B.parse_ops(args.ops)
        device = B.check_device(args.device)
    except B.BenchError as exc:
        raise UsageError(str(exc)) from None

    def progress(case, provider):
        if sys.stderr.isatty():
            print(f"\r  {case.op} {case.label()} {provider:<8}", end="", file=sys.stderr,
                  flush=True)

    report = B.run(ops, device=device, quick=args.quick, compile=args.compile,
                   threads=args.threads, progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    plotted = B.plot(report, args.plot) if args.plot else None
    m, st = report["machine"], report["settings"]
    print(f"fused-margin bench on {m['device']} ({m.get('gpu', str(m['cpu_count']) + ' CPU cores')}"
          f", load {', '.join(f'{v:.1f}' for v in m.get('loadavg', []))}); fp32; "
          f"{st['warmup']} warm-up + {st['repeats']} timed calls; memory: {st['memory']}\n")
    print(B.markdown(report))
    if args.plot and plotted is not None:
        print(f"{args.plot} not written: {plotted}")
    for path in (args.json, None if plotted is not None else args.plot):
        if path:
            print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ reproduce

def _add_reproduce(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "reproduce", help="small re-runs of the seed papers' headline claims, with a verdict",
        description="Re-run, at toy scale on bundled data, the headline claims of the papers "
                    "behind fused_margin over several seeds and report mean, spread and a "
                    "verdict per claim: (a) CAMRI raises the important class's recall over "
                    "CE/NormFace without losing accuracy; (b) ELM beats LDAM on long-tailed "
                    "digits; (c) ArcGrad beats softmax and AdaCos on UCI-size tables; (d) "
                    "sigma^2R lowers intra-class variance against center loss.",
        epilog="example: fused-margin reproduce --claims a,b --seeds 3 --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claims", metavar="LIST", help="comma-separated of a,b,c,d (default: all)")
    p.add_argument("--seeds", type=_int, default=3, help="seeds per run (default: 3)")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 3 epochs, claim (c) on iris only: a smoke test")
    p.add_argument("--out", metavar="DIR",
                   help="write DIR/reproduce.md and DIR/reproduce_<claim>.png")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.add_argument("--force", action="store_true",
                   help="overwrite DIR/reproduce.md even if it was edited by hand (the "
                        "report carries a hash of what this command wrote)")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-run progress lines")
    return p


def _run_reproduce(args: argparse.Namespace) -> int:
    from . import reproduce as R

    _check_output("--json", args.json)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    if args.out is not None:
        where = (args.out if os.path.isdir(args.out)
                 else os.path.dirname(os.path.abspath(args.out)))
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            raise UsageError(f"--out {args.out!r}: {where!r} is not a writable directory")
    try:
        claims = R.parse_claims(args.claims)
        if args.seeds < 1:
            raise R.ReproduceError(f"--seeds must be a positive integer, got {args.seeds}")
    except R.ReproduceError as exc:
        raise UsageError(str(exc)) from None
    if args.out is not None and not args.force:
        edited = R.hand_edited(os.path.join(args.out, "reproduce.md"))
        if edited:
            raise UsageError(f"{os.path.join(args.out, 'reproduce.md')} {edited}; pass --force "
                             "to overwrite it, or --out another directory")
    _require(SKLEARN, *([MATPLOTLIB] if args.out is not None else []))
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    import time

    t0 = time.perf_counter()
    results = R.run(claims, seeds=args.seeds, quick=args.quick, log=log)
    total = time.perf_counter() - t0
    for res in results:
        print(R.claim_markdown(res, None) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(R.to_json(results), f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.out is not None:
        path = R.write_report(results, args.out, seeds=args.seeds, quick=args.quick,
                              total_s=total)
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ backends

def _add_backends(sub) -> argparse.ArgumentParser:
    return sub.add_parser(
        "backends", help="which backends run here, and why not",
        description="Print fused_margin.backends(): each backend's availability (with the "
                    "reason) and which ops it implements.")


def _run_backends(args: argparse.Namespace) -> int:
    from ..dispatch import backends

    print(backends())
    return 0


# name -> (add the subparser, run it). `bench` and `reproduce` register here.
COMMANDS: Dict[str, Tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "train": (_add_train, _run_train),
    "bench": (_add_bench, _run_bench),
    "reproduce": (_add_reproduce, _run_reproduce),
    "backends": (_add_backends, _run_backends),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Margin-based classification losses as fused "
                                            "kernels: train and benchmark from the shell.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add, run in COMMANDS.values():
        add(sub).set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `fused-margin` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    prog = f"{PROG} {args.command}"
    try:
        return args._run(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:  # the library's input checks: one line, like a usage error
        print(f"{prog}: error: {_first_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except MissingExtra as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BrokenPipeError:
        # The reader (`| head`) left early; the work is done and its files written.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FloatingPointError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
