"""The arithmetic floor of a ViT-L prune beyond its calibration forward (BENCHMARKS.md, "Why ≤ 1× ...").

Multiply-accumulates counted from the widths of vit_large_patch16_224 pruned at ratio 0.5 everywhere (q/k,
v, fc1, embedding) with 16 calibration images, each printed as a ratio to the plain forward pass. Float64
work (the Cholesky solves) counts double: this CPU's float64 GEMM rate is about half its fp32 rate.
"""
D, H, d, F, L, N = 1024, 16, 64, 4096, 24, 197
IMAGES = 16
T = IMAGES * N                                  # calibration tokens per block
Dp, dqk, dv, Fp = 512, 32, 32, 2048             # kept widths at ratio 0.5

forward = L * T * (3 * D * D + D * D + 2 * D * F + 2 * N * H * d) + IMAGES * 768 * D * 196  # + patch embed
pruned_run = L * T * (Dp * H * (2 * dqk + dv) + H * dv * Dp + 2 * Dp * Fp + N * H * (dqk + dv))
# each fit (qkv, proj, fc1, fc2 with the bias column: n inputs, m outputs): prediction X W_Sᵀ, XᵀR, half Gram
# (the fitted output X W'ᵀ is part of the pruned run above)
fits = [(Dp + 1, H * (2 * dqk + dv)), (H * dv + 1, Dp), (Dp + 1, Fp), (Fp + 1, Dp)]
fit_per_token = sum(2 * n * m + n * n / 2 for n, m in fits)
solves = 2 * L * sum(n ** 3 / 6 + n * n * m for n, m in fits)  # potrf n³/3 flops + potrs 2n²m flops, as MACs ×2
redundancy = L * (F * F * D + 2 * D ** 3 + D * D * F) / 2 + D * D * 768 / 2  # fc1, v, proj rows, fc2 rows; patch embed
qk_grams = 2 * L * IMAGES * H * N * d * d                          # two float64 syrk per (image, head), ×2


def main() -> None:
    parts = {'redundancy scores (fp32)': redundancy, 'Q/K Grams (fp64)': qk_grams, 'pruned blocks run': pruned_run,
             'fit products (prediction, XᵀR, Gram)': L * T * fit_per_token, 'Cholesky solves (fp64)': solves}
    print(f'forward: {forward / 1e9:.0f} GMACs')
    for k, v in parts.items():
        print(f'{k:>40}: {v / forward:.2f}x')
    fixed = redundancy + qk_grams + pruned_run + solves
    print(f'{"beyond calibration, all tokens":>40}: {(fixed + L * T * fit_per_token) / forward:.2f}x')
    for tokens in (2048, 1024):
        t = (fixed + L * tokens * fit_per_token) / forward
        print(f'{f"refit_tokens={tokens}":>40}: {t:.2f}x; with bf16 redundancy at 3x: {t - redundancy / forward * 2 / 3:.2f}x')


if __name__ == '__main__':
    main()
