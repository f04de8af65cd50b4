/* Fused CPU kernels for the KVM state update (blocks/kvm.py), fp32.
 *
 * Each kernel does in one pass over rows what the PyTorch path does in several small ops, each of
 * which reads and writes its whole tensor: on a CPU those passes, not the arithmetic, are the cost
 * of an update. The results equal the PyTorch path's up to float rounding (sums here run in 8
 * lanes); tests/test_kvm_native.py checks each kernel against it.
 *
 * Conventions: a "row" is one token or one slot; row-major float32 with unit stride inside a row.
 * LayerNorm is torch's: biased variance, y = (x - mean) / sqrt(var + eps) * w + b.
 * Routing features with fewer dims (``_KVMCore._fewer_routing_dims``): with z zeroed dims,
 * a token's are [k[z:], a, 1], a slot's [k[z:], k[:z].w, k[:z].b] (w, b: the norm over dims < z).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float sum_f(const float *x, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i];
    return s;
}

static float dot_f(const float *x, const float *y, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

static float centred_sq_f(const float *x, int64_t n, float mean) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += (x[i] - mean) * (x[i] - mean);
    return s;
}

/* y = LayerNorm(x) over d dims, where x's first z dims count as zeros (and are not read). */
static void layer_norm_zeroed(const float *x, float *y, int64_t d, int64_t z, const float *w, const float *b,
                              float eps) {
    float mean = sum_f(x + z, d - z) / (float)d;
    float var = ((float)z * mean * mean + centred_sq_f(x + z, d - z, mean)) / (float)d;
    float rstd = 1.0f / sqrtf(var + eps);
    for (int64_t i = 0; i < z; i++) y[i] = -mean * rstd * w[i] + (b ? b[i] : 0.0f);
    for (int64_t i = z; i < d; i++) y[i] = (x[i] - mean) * rstd * w[i] + (b ? b[i] : 0.0f);
}

/* Tokens leaving the window, (N, H, C) rows addressed by strides (in floats) of k, v and g
 * (g: one gate per token), prepared for the state: keys with the first z dims zeroed, then
 * LayerNorm(w, b) -> ku (N*H*C, d); what a merge adds -> gated (N*H*C, d + dv), the key (times the
 * gate if gate_keys) and the value (times the gate if gate_values); routing features -> feat
 * (N*H*C, r): [ku[z:], a, 1] with a = (ku[:z] - b[:z]).w[:z] / |w[:z]|^2 if reduced, else ku. */
void kvm_incoming(int64_t n, int64_t h, int64_t c, int64_t d, int64_t dv, int64_t z,
                  const float *k, int64_t k_sn, int64_t k_sh, int64_t k_sc,
                  const float *v, int64_t v_sn, int64_t v_sh, int64_t v_sc,
                  const float *g, int64_t g_sn, int64_t g_sh, int64_t g_sc,
                  const float *w, const float *b, float eps, int gate_keys, int gate_values, int reduced,
                  float *ku, float *gated, float *feat) {
    int64_t r = reduced ? d - z + 2 : d;
    float ww = reduced ? dot_f(w, w, z) : 1.0f;
    float inv_ww = 1.0f / (ww > FLT_MIN ? ww : FLT_MIN);
    for (int64_t in = 0; in < n; in++)
        for (int64_t ih = 0; ih < h; ih++)
            for (int64_t ic = 0; ic < c; ic++) {
                int64_t row = (in * h + ih) * c + ic;
                const float *kx = k + in * k_sn + ih * k_sh + ic * k_sc;
                const float *vx = v + in * v_sn + ih * v_sh + ic * v_sc;
                float gate = g[in * g_sn + ih * g_sh + ic * g_sc];
                float *ky = ku + row * d, *gy = gated + row * (d + dv), *fy = feat + row * r;
                layer_norm_zeroed(kx, ky, d, z, w, b, eps);
                float kg = gate_keys ? gate : 1.0f, vg = gate_values ? gate : 1.0f;
                for (int64_t i = 0; i < d; i++) gy[i] = ky[i] * kg;
                for (int64_t i = 0; i < dv; i++) gy[d + i] = vx[i] * vg;
                if (reduced) {
                    float a = 0.0f;
                    for (int64_t i = 0; i < z; i++) a += (ky[i] - (b ? b[i] : 0.0f)) * (w[i] * inv_ww);
                    memcpy(fy, ky + z, (size_t)(d - z) * sizeof(float));
                    fy[d - z] = a;
                    fy[d - z + 1] = 1.0f;
                } else {
                    memcpy(fy, ky, (size_t)d * sizeof(float));
                }
            }
}

/* The read view of slot rows: sums (rows, d + dv) = key sum | value sum, lens (rows) ->
 * read_keys = LayerNorm(key sum; w, b) (rows, d); read_values (rows, dv) = value sum rescaled to
 * length lens (vlens) or divided by lens (count); feat (rows, r) = [rk[z:], rk[:z].w, rk[:z].b] if
 * reduced, else rk. The rows are ``index`` (m entries, repeats allowed) into every array, or, with
 * index NULL, rows 0..m-1. */
void kvm_read_rows(int64_t m, const int64_t *index, int64_t d, int64_t dv, int64_t z,
                   const float *sums, const float *lens, const float *w, const float *b, float eps,
                   int use_vlens, int reduced, float *read_keys, float *read_values, float *feat) {
    int64_t r = reduced ? d - z + 2 : d;
    for (int64_t i = 0; i < m; i++) {
        int64_t row = index ? index[i] : i;
        const float *kx = sums + row * (d + dv), *vx = kx + d;
        float *ky = read_keys + row * d, *vy = read_values + row * dv, *fy = feat + row * r;
        layer_norm_zeroed(kx, ky, d, 0, w, b, eps);
        float len = lens[row];
        float factor;
        if (use_vlens) {
            float norm = sqrtf(dot_f(vx, vx, dv));
            factor = len / (norm > 1e-12f ? norm : 1e-12f);
        } else {
            factor = 1.0f / len;
        }
        for (int64_t j = 0; j < dv; j++) vy[j] = vx[j] * factor;
        if (reduced) {
            memcpy(fy, ky + z, (size_t)(d - z) * sizeof(float));
            fy[d - z] = dot_f(ky, w, z);
            fy[d - z + 1] = b ? dot_f(ky, b, z) : 0.0f;
        } else {
            memcpy(fy, ky, (size_t)d * sizeof(float));
        }
    }
}

/* The running best (and its first index, unless index is NULL) of tokens j0..j1-1 over slots
 * lo..hi-1, scalar. */
static void route_scalar(const float *x, int64_t c, int64_t lo, int64_t hi, int64_t j0, int64_t j1,
                         float *best, int32_t *index) {
    for (int64_t is = lo; is < hi; is++)
        for (int64_t j = j0; j < j1; j++)
            if (x[is * c + j] > best[j]) {
                best[j] = x[is * c + j];
                if (index) index[j] = (int32_t)is;
            }
}

/* Routing scores (nh, s, c), slots by tokens -> per token (nh, c): ``every``, its best score over all
 * slots; ``best`` and ``index``, the best score and first best slot among slots skip.. (best = -inf,
 * index = 0 if there are none). One pass over the scores in memory order; with AVX2, four slot rows
 * at a time update the running best of 8 tokens per register. */
void kvm_route(int64_t nh, int64_t s, int64_t c, const float *scores, int64_t skip,
               float *every, float *best, int64_t *index, int32_t *scratch) {
    if (skip > s) skip = s;
    for (int64_t ih = 0; ih < nh; ih++) {
        const float *x = scores + ih * s * c;
        float *ev = every + ih * c, *bs = best + ih * c;
        int32_t *ix = scratch;
        for (int64_t j = 0; j < c; j++) { ev[j] = -INFINITY; bs[j] = -INFINITY; ix[j] = 0; }
        route_scalar(x, c, 0, skip, 0, c, ev, NULL);  /* the sinks: only their best score matters */
        int64_t is = skip, vec = 0;
#ifdef __AVX2__
        vec = c - c % 8;
        for (; is + 4 <= s; is += 4) {
            const float *row = x + is * c;
            for (int64_t j = 0; j < vec; j += 8) {
                __m256 b = _mm256_loadu_ps(bs + j);
                __m256 i = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(ix + j)));
                for (int r = 0; r < 4; r++) {
                    __m256 val = _mm256_loadu_ps(row + r * c + j);
                    __m256 better = _mm256_cmp_ps(val, b, _CMP_GT_OQ);
                    b = _mm256_blendv_ps(b, val, better);
                    i = _mm256_blendv_ps(i, _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)(is + r))), better);
                }
                _mm256_storeu_ps(bs + j, b);
                _mm256_storeu_si256((__m256i *)(ix + j), _mm256_castps_si256(i));
            }
            route_scalar(x, c, is, is + 4, vec, c, bs, ix);
        }
#endif
        route_scalar(x, c, is, s, 0, c, bs, ix);
        for (int64_t t = 0; t < c; t++) {
            ev[t] = bs[t] > ev[t] ? bs[t] : ev[t];
            index[ih * c + t] = ix[t];
        }
    }
}

/* Merges: rows (nh, m, f) added into sums (nh, cap, f) at slots target (nh, m), in order (as
 * torch's index_add); with counts (non-NULL, (nh, cap)), one more token counted per merge. */
void kvm_merge_rows(int64_t nh, int64_t m, int64_t f, int64_t cap, const int64_t *target, const float *rows,
                    float *sums, float *counts) {
    for (int64_t ih = 0; ih < nh; ih++)
        for (int64_t i = 0; i < m; i++) {
            int64_t slot = ih * cap + target[ih * m + i];
            float *y = sums + slot * f;
            const float *x = rows + (ih * m + i) * f;
#pragma omp simd
            for (int64_t j = 0; j < f; j++) y[j] += x[j];
            if (counts) counts[slot] += 1.0f;
        }
}
