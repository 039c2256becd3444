"""Per kernel variant of the fused margin cross-entropy, built for sm_90 as a real launch
builds it (tests/sm90_compile.py: the launchers' own choices under
FUSED_MARGIN_TRITON_CONFIG=sm90, Triton's binder for the specialisation): registers,
spill bytes (ptxas), shared memory, pipeline stages, warps, the MMA instructions in the
SASS (wgmma = HGMMA, mma.sync = HMMA, DMMA for float64, FFMA = no tensor cores), and
for the tl.dot kernels the tile's FLOP per byte of operand traffic (2 BN BC BD over
(BN + BC) BD element bytes per D step: what one program asks of L2).

    python bench/sm90_report.py                 # markdown table on stdout
    python bench/sm90_report.py --json out.json --ragged

No GPU needed (Triton's ptxas and cuobjdump). Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--ragged", action="store_true", help="also N, C, D that 16 does not divide")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET")
    import sm90_compile as sc

    rows = []
    for r in sc.record(args.ragged, all_kinds=True):
        rows.append(sc.inspect(r, sc.build(r)))
    print("| variant | regs | spill B | shared B | stages | warps | MMA in SASS | MMA in a loop "
          "| tile FLOP/B | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in rows:
        fpb = f"{i['flop_per_byte']:.0f}" if "flop_per_byte" in i else "-"
        print(f"| {i['label']} | {i['regs']} | {i['spills']} | {i['shared']} | {i['stages']} | "
              f"{i['warps']} | {i['kind']} | {','.join(i['in_loop']) or '-'} | {fpb} | "
              f"{'; '.join(i['problems']) or 'ok'} |")
    bad = [i for i in rows if i["problems"]]
    print(f"\n{len(rows)} variants, {len(bad)} failing (spills, or a bf16/fp16/TF32 hot loop "
          "without wgmma)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
