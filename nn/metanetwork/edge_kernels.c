/* Fused CPU kernels of one metanetwork layer's edge work (see nn/metanetwork/kernels.py for the contract).
 *
 * Compiled on first use by kernels.py with -O3 -march=native -ffp-contract=off -fno-trapping-math (without it,
 * GCC leaves the loops with conditionals scalar on AVX2; kernels.py says why) and the macros
 *   HD  : hidden width H (a compile-time constant, so the per-row loops unroll and vectorise fully)
 *   ACT : 0 silu, 1 relu, 2 tanh
 * One pass over the edges does everything an edge row needs (layer norm, the edge matrix-vector product,
 * both message directions, the activation, the four running statistics, the gated edge update), so no
 * edge-sized temporary is ever written. -ffp-contract=off and an exp built from + - * / only make act()
 * bit-identical wherever it is inlined, which the max/min hit test of the backward kernel relies on (the
 * matrix-vector products use explicit fmaf, also exactly rounded, for speed).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HALF (HD / 2)
#define LN_EPS 1e-5f

/* exp(x) for float, ~1 ulp on the clamped range; only + - * / and an exponent bit-shift, so vectorisable. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* round to nearest by adding and removing 1.5 * 2^23 (exact with -ffp-contract=off, and vectorisable) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;            /* ln2 split in a high part exact in float ... */
    r = r - n * -2.12194440e-4f;               /* ... and the low remainder */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* activation; act_and_grad computes it in exactly the same operations (so the value is bit-identical) and
 * also returns act'(x), reusing the sigmoid instead of evaluating exp again */
static inline float act(float x) {
#if ACT == 0
    return x * sigmoid(x);
#elif ACT == 1
    return x > 0.0f ? x : 0.0f;
#else
    return 2.0f * sigmoid(2.0f * x) - 1.0f;
#endif
}

static inline float act_and_grad(float x, float *grad) {
#if ACT == 0
    float s = sigmoid(x);
    *grad = s * (1.0f + x * (1.0f - s));
    return x * s;
#elif ACT == 1
    *grad = x > 0.0f ? 1.0f : 0.0f;
    return x > 0.0f ? x : 0.0f;
#else
    float y = 2.0f * sigmoid(2.0f * x) - 1.0f;
    *grad = 1.0f - y * y;
    return y;
#endif
}

/* layer norm without affine of one row: writes en, returns rstd */
static inline float layer_norm_row(const float *x, float *en) {
    float mu = 0.0f, var = 0.0f;
    for (int k = 0; k < HD; k++) mu += x[k];
    mu /= HD;
    for (int k = 0; k < HD; k++) { float c = x[k] - mu; var += c * c; }
    float rstd = 1.0f / sqrtf(var / HD + LN_EPS);
    for (int k = 0; k < HD; k++) en[k] = (x[k] - mu) * rstd;
    return rstd;
}

/* running sum, sum of squares, max and min with hit counts of one table row */
static inline void accumulate(const float *restrict m, float *restrict tot, float *restrict sq, float *restrict mx,
                              float *restrict cmx, float *restrict mn, float *restrict cmn) {
    for (int j = 0; j < HD; j++) {
        float v = m[j], hi = mx[j], lo = mn[j];
        tot[j] += v;
        sq[j] += v * v;
        cmx[j] = v > hi ? 1.0f : (v == hi ? cmx[j] + 1.0f : cmx[j]);
        mx[j] = v > hi ? v : hi;
        cmn[j] = v < lo ? 1.0f : (v == lo ? cmn[j] + 1.0f : cmn[j]);
        mn[j] = v < lo ? v : lo;
    }
}

/* gradient of the pre-activations of one row: g_m = A + B m + [m = max] G_max + [m = min] G_min, times act' */
static inline void grad_pre(const float *restrict p, const float *restrict ca, const float *restrict cb,
                            const float *restrict mx, const float *restrict gx, const float *restrict mn,
                            const float *restrict gn, float *restrict out) {
    for (int j = 0; j < HD; j++) {
        float d;
        float m = act_and_grad(p[j], &d), hi = mx[j], lo = mn[j], ghi = gx[j], glo = gn[j];
        float g = ca[j] + cb[j] * m + (m == hi ? ghi : 0.0f) + (m == lo ? glo : 0.0f);
        out[j] = g * d;
    }
}

static inline void add_row(float *restrict out, const float *restrict x) {
    for (int j = 0; j < HD; j++) out[j] += x[j];
}

/* Forward over edges [0, E). wt: (H, H) transposed edge weight, wt[k * H + j] = W[j, k].
 * stats: 6 tables (2N, H): sum, squares, max, max hits, min, min hits (max/min start at -inf/+inf, hits 0).
 * pre: (E, 2H) pre-activations [forward | reverse] or NULL; e_new: (E, H). */
void edge_forward(int64_t E, int64_t N, const float *e, const float *ps, const float *pt, const float *a,
                  const float *b, const float *wt, const int64_t *src, const int64_t *dst, float *stats,
                  float *pre, float *e_new) {
    const int64_t T = 2 * N * HD; /* size of one statistics table */
    float *tot = stats, *sq = stats + T, *mx = stats + 2 * T, *cmx = stats + 3 * T, *mn = stats + 4 * T,
          *cmn = stats + 5 * T;
    for (int64_t i = 0; i < E; i++) {
        const int64_t s = src[i], d = dst[i];
        const float *x = e + i * HD;
        float en[HD], q1[HD], q2[HD], pf[HD], pb[HD], mf[HD], mb[HD];
        layer_norm_row(x, en);
        for (int j = 0; j < HD; j++) { q1[j] = 0.0f; q2[j] = 0.0f; }
        for (int k = 0; k < HALF; k++)
            for (int j = 0; j < HD; j++) q1[j] = fmaf(wt[k * HD + j], en[k], q1[j]);
        for (int k = HALF; k < HD; k++)
            for (int j = 0; j < HD; j++) q2[j] = fmaf(wt[k * HD + j], en[k], q2[j]);
        const float *ps_s = ps + s * HD, *ps_d = ps + d * HD, *pt_s = pt + s * HD, *pt_d = pt + d * HD;
        for (int j = 0; j < HD; j++) {
            pf[j] = ps_s[j] + pt_d[j] + (q1[j] + q2[j]);
            pb[j] = ps_d[j] + pt_s[j] + (q1[j] - q2[j]);
            mf[j] = act(pf[j]);
            mb[j] = act(pb[j]);
        }
        const int64_t rf = d * HD, rb = (N + s) * HD;
        accumulate(mf, tot + rf, sq + rf, mx + rf, cmx + rf, mn + rf, cmn + rf);
        accumulate(mb, tot + rb, sq + rb, mx + rb, cmx + rb, mn + rb, cmn + rb);
        if (pre) {
            memcpy(pre + i * 2 * HD, pf, sizeof(pf));
            memcpy(pre + i * 2 * HD + HD, pb, sizeof(pb));
        }
        const float *a_s = a + s * HD, *a_d = a + d * HD, *b_s = b + s * HD, *b_d = b + d * HD;
        float *y = e_new + i * HD;
        for (int j = 0; j < HD; j++) y[j] = x[j] + en[j] * (a_s[j] * b_d[j] + a_d[j] * b_s[j]);
    }
}

#define TILE 8 /* edges per weight-gradient update: each g_W row is loaded and stored once per TILE edges */

/* g_W[:, :H/2] += sum_t gq1[t] en[t, :H/2]^T and g_W[:, H/2:] += sum_t gq2[t] en[t, H/2:]^T over a tile */
static void weight_grad_tile(int n, const float (*en)[HD], const float (*gq1)[HD], const float (*gq2)[HD],
                             float *restrict g_w) {
    for (int j = 0; j < HD; j++) {
        float *row = g_w + j * HD;
        for (int t = 0; t < n; t++) {
            const float c1 = gq1[t][j], c2 = gq2[t][j];
            for (int k = 0; k < HALF; k++) row[k] = fmaf(c1, en[t][k], row[k]);
            for (int k = HALF; k < HD; k++) row[k] = fmaf(c2, en[t][k], row[k]);
        }
    }
}

/* Backward over edges [0, E) (pointers offset to a range of edges; ranges run in parallel threads).
 * coef: 6 tables (2N, H): A, B (mean/std coefficients), max, max gradient per hit, min, min gradient per hit;
 * g_m = A + B m + [m = max] G_max + [m = min] G_min. w: (H, H) edge weight (row j = output channel).
 * Accumulates grads, 4 tables (N, H): g_ps, g_pt, g_a, g_b, and g_w (H, H); writes g_e (E, H). */
void edge_backward(int64_t E, int64_t N, const float *e, const float *ge, const float *pre, const float *a,
                   const float *b, const float *w, const int64_t *src, const int64_t *dst, const float *coef,
                   float *grads, float *g_w, float *g_e) {
    const int64_t T = 2 * N * HD, G = N * HD;
    const float *ca = coef, *cb = coef + T, *mx = coef + 2 * T, *gx = coef + 3 * T, *mn = coef + 4 * T,
                *gn = coef + 5 * T;
    float *g_ps = grads, *g_pt = grads + G, *g_a = grads + 2 * G, *g_b = grads + 3 * G;
    float en[TILE][HD], gq1[TILE][HD], gq2[TILE][HD];
    for (int64_t i = 0; i < E; i++) {
        const int t = (int)(i % TILE);
        const int64_t s = src[i], d = dst[i];
        const float *x = e + i * HD, *g = ge + i * HD, *pf = pre + i * 2 * HD, *pb = pf + HD;
        float gpf[HD], gpb[HD], g_en[HD], gg[HD], tmp[HD];
        const float rstd = layer_norm_row(x, en[t]);
        const int64_t rf = d * HD, rb = (N + s) * HD;
        grad_pre(pf, ca + rf, cb + rf, mx + rf, gx + rf, mn + rf, gn + rf, gpf);
        grad_pre(pb, ca + rb, cb + rb, mx + rb, gx + rb, mn + rb, gn + rb, gpb);
        for (int j = 0; j < HD; j++) {
            gq1[t][j] = gpf[j] + gpb[j];
            gq2[t][j] = gpf[j] - gpb[j];
        }
        add_row(g_ps + s * HD, gpf);
        add_row(g_pt + d * HD, gpf);
        add_row(g_ps + d * HD, gpb);
        add_row(g_pt + s * HD, gpb);
        for (int k = 0; k < HD; k++) g_en[k] = 0.0f;
        for (int j = 0; j < HD; j++) {
            const float *wj = w + j * HD;
            for (int k = 0; k < HALF; k++) g_en[k] = fmaf(gq1[t][j], wj[k], g_en[k]);
            for (int k = HALF; k < HD; k++) g_en[k] = fmaf(gq2[t][j], wj[k], g_en[k]);
        }
        const float *a_s = a + s * HD, *a_d = a + d * HD, *b_s = b + s * HD, *b_d = b + d * HD;
        for (int k = 0; k < HD; k++) {
            g_en[k] += g[k] * (a_s[k] * b_d[k] + a_d[k] * b_s[k]);
            gg[k] = g[k] * en[t][k];
        }
        for (int k = 0; k < HD; k++) tmp[k] = b_d[k] * gg[k];
        add_row(g_a + s * HD, tmp);
        for (int k = 0; k < HD; k++) tmp[k] = b_s[k] * gg[k];
        add_row(g_a + d * HD, tmp);
        for (int k = 0; k < HD; k++) tmp[k] = a_s[k] * gg[k];
        add_row(g_b + d * HD, tmp);
        for (int k = 0; k < HD; k++) tmp[k] = a_d[k] * gg[k];
        add_row(g_b + s * HD, tmp);
        float mean_g = 0.0f, mean_ge = 0.0f;
        for (int k = 0; k < HD; k++) { mean_g += g_en[k]; mean_ge += g_en[k] * en[t][k]; }
        mean_g /= HD;
        mean_ge /= HD;
        float *y = g_e + i * HD;
        for (int k = 0; k < HD; k++) y[k] = rstd * (g_en[k] - mean_g - en[t][k] * mean_ge) + g[k];
        if (t == TILE - 1 || i == E - 1)
            weight_grad_tile(t + 1, (const float (*)[HD])en, (const float (*)[HD])gq1, (const float (*)[HD])gq2, g_w);
    }
}
