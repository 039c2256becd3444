"""The cost model of docs/kernels.md: FLOPs, HBM and L2 bytes per kernel of the fused
margin cross-entropy (forward + backward) and a predicted time, for N x D x C, bf16 or
fp32, on an H100 or H200. A PREDICTION: no GPU has run these kernels. Every rate below
is an assumption, named.

    python bench/cost_model.py            # the docs' table
"""
from __future__ import annotations

# Assumed rates (per second). H100 SXM: bf16 cuBLAS rate from the measured floor
# (3 products of 4096 x 512 x 100K in 1.83 ms = 687 TFLOP/s), HBM 3.35 TB/s, L2 -> SM
# 7 TB/s (the balance point, ~110-140 FLOP/B at 790-990 TFLOP/s), plain fp32
# 67 TFLOP/s peak (cuBLAS SGEMM ~51, Triton's FMA dot ~34: half of peak), 132 SMs x 16
# MUFU ex2 / clock x 1.755 GHz. H200: the same chip with 4.8 TB/s (790 TFLOP/s measured
# on random data here, KINDS.md).
GPUS = {
    "H100": dict(mma16=687e12, hbm=3.35e12, l2=7.0e12, fp32=67e12, sgemm=51e12,
                 fma_dot=34e12, ex2=132 * 16 * 1.755e9, tf32=340e12),
    "H200": dict(mma16=790e12, hbm=4.8e12, l2=7.0e12, fp32=67e12, sgemm=51e12,
                 fma_dot=34e12, ex2=132 * 16 * 1.755e9, tf32=390e12),
}
FLOOR_H100_BF16_MS = {100_000: 1.83, 1_000_000: 18.8}  # measured (the issue)
# tiles (angular.SM90): bf16 128 x 128 x 64 (the forward sweep 256 x 128, fwd_outer);
# fp32 IEEE 128 x 64 x 16
TILE = {"bf16": (128, 128, 2), "fp32": (128, 64, 4)}
TILE_FWD = {"bf16": (256, 128, 2), "fp32": (128, 64, 4)}
EPI_OPS = {"fwd": 12, "grad": 18}  # fp32 ops per logit after the product (arcface)


def model(N, D, C, dt, gpu):
    g = GPUS[gpu]
    es = 2 if dt == "bf16" else 4
    P = 2 * N * D * C  # one product
    bn, bc, tes = TILE[dt]
    fpb = 2 * bn * bc / ((bn + bc) * tes)  # tile FLOP per byte of L2 -> SM traffic
    fbn, fbc, _ = TILE_FWD[dt]
    fpb_f = 2 * fbn * fbc / ((fbn + fbc) * tes)
    if dt == "bf16":
        dot_rate = min(g["mma16"], fpb * g["l2"])
        dot_rate_f = min(g["mma16"], fpb_f * g["l2"])
        mm_rate = g["mma16"]
    else:
        dot_rate = dot_rate_f = g["fma_dot"]
        mm_rate = g["sgemm"]
    logits = N * C
    rows = []

    def row(name, flops, hbm, l2, t):
        rows.append(dict(kernel=name, gflop=flops / 1e9, hbm_gb=hbm / 1e9, l2_gb=l2 / 1e9,
                         ms=t * 1e3))

    w_bytes = C * D * es
    row("row_scale W, x (+ xs copy)", 0, w_bytes + 3 * N * D * es, 0,
        (w_bytes + 3 * N * D * es) / g["hbm"])
    epi_f = logits * EPI_OPS["fwd"] / g["fp32"] + logits / g["ex2"]
    row("fwd sweep (lse partials)", P, w_bytes, P / fpb_f, P / dot_rate_f + epi_f)
    row("finish (merge, indexed dot)", 2 * N * D, N * D * es * 2, 0, 2 * N * D * es / g["hbm"])
    g_bytes = logits * es
    epi_b = logits * EPI_OPS["grad"] / g["fp32"] + logits / g["ex2"]
    # the G tile's store drains while the next tile's products run: half of it exposed
    row("grad kernel (recompute, write G)", P, w_bytes + g_bytes, P / fpb,
        P / dot_rate + epi_b + 0.5 * g_bytes / g["hbm"])
    # cuBLAS at the floor's own rate (which already pays for reading its N x C operand)
    row("torch.mm dW = G^T xs", P, g_bytes + C * D * 4, 0, P / mm_rate)
    row("torch.addmm dX += G W_c", P, g_bytes + w_bytes, 0, P / mm_rate)
    proj = C * D * (4 + es + es) + 2 * N * D * 4
    row("projections + accumulators", 0, proj + C * D * 4, 0, (proj + C * D * 4) / g["hbm"])
    total = sum(r["ms"] for r in rows)
    if dt == "bf16":
        floor = FLOOR_H100_BF16_MS.get(C) if gpu == "H100" else None
        floor_src = "measured (H100)" if floor else None
    else:
        floor = None
    if floor is None:  # 3 products at the library rate (which pays for the logits' traffic)
        floor = 3 * P / mm_rate * 1e3
        floor_src = "predicted"
    return rows, total, floor, floor_src


def main():
    print("| GPU | dtype | C | predicted ms | floor ms | x floor |")
    print("|---|---|---|---|---|---|")
    for gpu in ("H100", "H200"):
        for dt in ("bf16", "fp32"):
            for C in (100_000, 1_000_000):
                _, total, floor, src = model(4096, 512, C, dt, gpu)
                print(f"| {gpu} | {dt} | {C:,} | {total:.2f} | {floor:.2f} ({src}) | "
                      f"{total / floor:.2f} |")
    for dt in ("bf16", "fp32"):
        rows, total, _, _ = model(4096, 512, 100_000, dt, "H100")
        print(f"\nH100, {dt}, N=4096, D=512, C=100,000, per kernel (predicted):")
        print("| kernel | GFLOP | HBM GB | L2->SM GB | ms |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kernel']} | {r['gflop']:.0f} | {r['hbm_gb']:.2f} | {r['l2_gb']:.2f} | "
                  f"{r['ms']:.3f} |")
        print(f"| total | | | | {total:.2f} |")


if __name__ == "__main__":
    main()
