/* Fused CPU kernels for KVM (blocks/kvm/native.py), fp32: the state update at a chunk boundary and the
 * read of a whole chunk. In order: the update's parts (token preparation, merges with the re-read
 * of touched slots, routing), each also a kernel of its own for the path without a BLAS; the join
 * of two partial softmaxes (that path's chunk read); the chunk read; the whole update in one call;
 * whole chunks in a row (their updates and reads) in one call.
 *
 * Each update kernel does in one pass over rows what the PyTorch path does in several small ops,
 * each of which reads and writes its whole tensor: on a CPU those passes, not the arithmetic, are
 * the cost of an update; the whole-update kernel also keeps each head's chunk in cache from its
 * preparation to its merges. The results equal the PyTorch path's up to float rounding (sums here run in 8
 * lanes); tests/test_kvm_native.py checks each kernel against it. Routing is discrete: where two
 * slots' scores, or two tokens' novelties, tie to within that rounding, it may go the other way
 * than on the PyTorch path (as between two BLAS builds), and the states part from there on.
 *
 * Threads: OpenMP over rows or heads (a graph of tasks for a run of chunks), in the OpenMP runtime
 * torch already loaded (same soname), so torch.set_num_threads applies here too; calls with fewer
 * than PARALLEL_ROWS rows stay serial.
 * Conventions: a "row" is one token or one slot; row-major float32 with unit stride inside a row.
 * LayerNorm is torch's: biased variance, y = (x - mean) / sqrt(var + eps) * w + b.
 * Routing features with fewer dims (``SlotCodec.fewer_routing_dims``): with z zeroed dims,
 * a token's are [k[z:], a, 1], a slot's [k[z:], k[:z].w, k[:z].b] (w, b: the norm over dims < z).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

#define PARALLEL_ROWS 256

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

/* One token leaving the window, prepared for the state: its key kx (d) with the first z dims zeroed,
 * then LayerNorm(w, b) -> ky (d); what a merge adds -> gy (d + dv), the key (times the gate if
 * gate_keys) and the value vx (times the gate if gate_values); routing features -> fy (r):
 * [ky[z:], a, 1] with a = (ky[:z] - b[:z]).w[:z] * inv_ww (inv_ww = 1 / |w[:z]|^2) if reduced,
 * else ky. ky may be gy itself. */
static void prepare_token(const float *kx, const float *vx, float gate, int64_t d, int64_t dv, int64_t z,
                          const float *w, const float *b, float eps, int gate_keys, int gate_values, int reduced,
                          float inv_ww, float *ky, float *gy, float *fy) {
    layer_norm_zeroed(kx, ky, d, z, w, b, eps);
    if (reduced) {
        float a = 0.0f;
        if (b) {
#pragma omp simd reduction(+ : a)
            for (int64_t i = 0; i < z; i++) a += (ky[i] - b[i]) * w[i];
        } else {
            a = dot_f(ky, w, z);
        }
        memcpy(fy, ky + z, (size_t)(d - z) * sizeof(float));
        fy[d - z] = a * inv_ww;
        fy[d - z + 1] = 1.0f;
    } else {
        memcpy(fy, ky, (size_t)d * sizeof(float));
    }
    float kg = gate_keys ? gate : 1.0f, vg = gate_values ? gate : 1.0f;
    for (int64_t i = 0; i < d; i++) gy[i] = ky[i] * kg;
    for (int64_t i = 0; i < dv; i++) gy[d + i] = vx[i] * vg;
}

/* 1 / |w[:z]|^2 for ``prepare_token`` (w = 0 gives a = 0). */
static float inverse_sq_norm(const float *w, int64_t z) {
    float ww = dot_f(w, w, z);
    return 1.0f / (ww > FLT_MIN ? ww : FLT_MIN);
}

/* Tokens leaving the window, (N, H, C) rows addressed by strides (in floats) of k, v and g
 * (g: one gate per token), each through ``prepare_token`` -> ku (N*H*C, d), gated (N*H*C, d + dv)
 * and feat (N*H*C, r). */
void kvm_incoming(int64_t n, int64_t h, int64_t c, int64_t d, int64_t dv, int64_t z,
                  const float *k, int64_t k_sn, int64_t k_sh, int64_t k_sc,
                  const float *v, int64_t v_sn, int64_t v_sh, int64_t v_sc,
                  const float *g, int64_t g_sn, int64_t g_sh, int64_t g_sc,
                  const float *w, const float *b, float eps, int gate_keys, int gate_values, int reduced,
                  float *ku, float *gated, float *feat) {
    int64_t r = reduced ? d - z + 2 : d;
    float inv_ww = reduced ? inverse_sq_norm(w, z) : 1.0f;
#pragma omp parallel for schedule(static) collapse(3) if (n * h * c >= PARALLEL_ROWS)
    for (int64_t in = 0; in < n; in++)
        for (int64_t ih = 0; ih < h; ih++)
            for (int64_t ic = 0; ic < c; ic++) {
                int64_t row = (in * h + ih) * c + ic;
                prepare_token(k + in * k_sn + ih * k_sh + ic * k_sc, v + in * v_sn + ih * v_sh + ic * v_sc,
                              g[in * g_sn + ih * g_sh + ic * g_sc], d, dv, z, w, b, eps, gate_keys, gate_values, reduced,
                              inv_ww, ku + row * d, gated + row * (d + dv), feat + row * r);
            }
}

/* The read view of one slot row: sums row = key sum | value sum, len -> read key = LayerNorm(key
 * sum; w, b) (d); read value (dv) = value sum rescaled to length len (vlens) or divided by len
 * (count); routing features (r) = [rk[z:], rk[:z].w, rk[:z].b] if reduced, else rk. */
static void read_row(const float *sums, float len, int64_t d, int64_t dv, int64_t z, const float *w,
                     const float *b, float eps, int use_vlens, int reduced, float *ky, float *vy, float *fy) {
    const float *kx = sums, *vx = sums + d;
    layer_norm_zeroed(kx, ky, d, 0, w, b, eps);
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

/* The merges of one head and the read view they change: rows (m, d + dv; merge i adds row
 * row_of[i], or row i if row_of is NULL) added to slot rows target (m) of sums (cap, d + dv), each
 * counted in lens if count_merges; then the read view (read_keys (cap, d), read_values (cap, dv),
 * feat (cap, r)) recomputed for every slot a merge touched and every appended one, first_new..num-1
 * (no other changed). Slots are visited in
 * address order (merges grouped by slot with a counting sort that keeps token order within a slot,
 * so every sum equals torch's index_add bit for bit), and each is read right after its merges,
 * while its row is in cache. start (num + 1) and order (m): scratch. */
static void merge_read_head(int64_t m, int64_t num, int64_t first_new, int64_t d, int64_t dv, int64_t z,
                            const int64_t *target, const float *rows, const int64_t *row_of, int count_merges,
                            float *sums, float *lens,
                            const float *w, const float *b, float eps, int use_vlens, int reduced, float *read_keys,
                            float *read_values, float *feat, int64_t *start, int64_t *order) {
    int64_t f = d + dv, r = reduced ? d - z + 2 : d;
    memset(start, 0, (size_t)(num + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < m; i++) start[target[i] + 1]++;
    for (int64_t is = 0; is < num; is++) start[is + 1] += start[is];  /* slot is's merges: order[start[is]..start[is+1]) */
    for (int64_t i = 0; i < m; i++) order[start[target[i]]++] = i;  /* leaves start[is] = the end of slot is's merges */
    for (int64_t is = 0, at = 0; is < num; is++) {
        int64_t end = start[is];
        if (end == at && is < first_new) continue;  /* no merges, not new: its view stands */
        float *y = sums + is * f;
        for (; at < end; at++) {
            const float *x = rows + (row_of ? row_of[order[at]] : order[at]) * f;
#pragma omp simd
            for (int64_t j = 0; j < f; j++) y[j] += x[j];
            if (count_merges) lens[is] += 1.0f;
        }
        read_row(y, lens[is], d, dv, z, w, b, eps, use_vlens, reduced, read_keys + is * d, read_values + is * dv,
                 feat + is * r);
    }
}

/* One boundary update's merges (``merge_read_head``) for nh heads of a room of cap slot rows
 * (sums (nh, cap, d + dv), lens (nh, cap); read_keys (nh, cap, d), read_values (nh, cap, dv),
 * feat (nh, cap, r)) holding num slots, of which first_new.. were just appended: rows
 * (nh, m, d + dv) at slots target (nh, m). Returns 0, or -1 if out of memory. */
int kvm_merge_read(int64_t nh, int64_t m, int64_t cap, int64_t num, int64_t first_new, int64_t d, int64_t dv,
                   int64_t z, const int64_t *target, const float *rows, int count_merges, float *sums,
                   float *lens, const float *w, const float *b, float eps, int use_vlens, int reduced,
                   float *read_keys, float *read_values, float *feat) {
    int64_t f = d + dv, r = reduced ? d - z + 2 : d;
    int failed = 0;
#pragma omp parallel for schedule(static) if (nh * (m + num) >= PARALLEL_ROWS)
    for (int64_t ih = 0; ih < nh; ih++) {
        int64_t *start = malloc((size_t)(num + 1) * sizeof(int64_t)), *order = malloc((size_t)(m + 1) * sizeof(int64_t));
        if (start && order)
            merge_read_head(m, num, first_new, d, dv, z, target + ih * m, rows + ih * m * f, NULL, count_merges,
                            sums + ih * cap * f, lens + ih * cap, w, b, eps, use_vlens, reduced, read_keys + ih * cap * d,
                            read_values + ih * cap * dv, feat + ih * cap * r, start, order);
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(start);
        free(order);
    }
    return failed ? -1 : 0;
}

/* The running best (and its first index, unless index is NULL) of tokens j0..j1-1 over score
 * rows lo..hi-1 of slots slot0 + row, scalar. */
static void route_scalar(const float *x, int64_t ldx, int64_t lo, int64_t hi, int64_t j0, int64_t j1, int64_t slot0,
                         float *best, int32_t *index) {
    for (int64_t is = lo; is < hi; is++)
        for (int64_t j = j0; j < j1; j++)
            if (x[is * ldx + j] > best[j]) {
                best[j] = x[is * ldx + j];
                if (index) index[j] = (int32_t)(slot0 + is);
            }
}

/* The running best of tokens 0..nt-1 (score columns, ldx floats apart between slot rows) over score
 * rows 0..s-1 of slots slot0.., updating every, best and index (nt each) as ``kvm_route`` says.
 * One pass over the scores in memory order; with AVX2, four slot rows at a time update the running
 * best of 8 tokens per register. */
static void route_rows(const float *x, int64_t ldx, int64_t s, int64_t nt, int64_t slot0, int64_t skip,
                       float *ev, float *bs, int32_t *ix) {
    int64_t sinks = skip - slot0 < 0 ? 0 : (skip - slot0 > s ? s : skip - slot0);  /* this block's sink rows */
    route_scalar(x, ldx, 0, sinks, 0, nt, 0, ev, NULL);  /* sinks: only their best score matters */
    int64_t is = sinks;
#ifdef __AVX2__
    int64_t vec = nt - nt % 8;
    for (; is + 4 <= s; is += 4) {
        const float *row = x + is * ldx;
        for (int64_t j = 0; j < vec; j += 8) {
            __m256 b = _mm256_loadu_ps(bs + j);
            __m256 i = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(ix + j)));
            for (int r = 0; r < 4; r++) {
                __m256 val = _mm256_loadu_ps(row + r * ldx + j);
                __m256 better = _mm256_cmp_ps(val, b, _CMP_GT_OQ);
                __m256i slot = _mm256_set1_epi32((int32_t)(slot0 + is + r));
                b = _mm256_blendv_ps(b, val, better);
                i = _mm256_blendv_ps(i, _mm256_castsi256_ps(slot), better);
            }
            _mm256_storeu_ps(bs + j, b);
            _mm256_storeu_si256((__m256i *)(ix + j), _mm256_castps_si256(i));
        }
        route_scalar(x, ldx, is, is + 4, vec, nt, slot0, bs, ix);
    }
#endif
    route_scalar(x, ldx, is, s, 0, nt, slot0, bs, ix);
}

static void route_init(int64_t nt, float *ev, float *bs, int32_t *ix) {
    for (int64_t j = 0; j < nt; j++) { ev[j] = -INFINITY; bs[j] = -INFINITY; ix[j] = 0; }
}

static void route_finish(int64_t nt, float *ev, const float *bs) {
    for (int64_t j = 0; j < nt; j++) ev[j] = bs[j] > ev[j] ? bs[j] : ev[j];
}

/* Routing: the best slot of each token, over the score rows of slots slot0..slot0+s-1, in blocks.
 * scores (nh, s, c), slots by tokens; every, best (nh, c) and index (nh, c) carry the running result
 * from block to block (init: this is the first block): ``every``, each token's best score over all
 * slots; ``best`` and ``index``, its best score and first best slot among slots >= skip (best = -inf,
 * index = 0 while there are none). */
void kvm_route(int64_t nh, int64_t s, int64_t c, const float *scores, int64_t slot0, int64_t skip, int init,
               float *every, float *best, int32_t *index) {
#pragma omp parallel for schedule(static) if (nh * s >= PARALLEL_ROWS)
    for (int64_t ih = 0; ih < nh; ih++) {
        float *ev = every + ih * c, *bs = best + ih * c;
        int32_t *ix = index + ih * c;
        if (init) route_init(c, ev, bs, ix);
        route_rows(scores + ih * s * c, c, s, c, slot0, skip, ev, bs, ix);
        route_finish(c, ev, bs);
    }
}

/* The joint softmax of a window read and a state read, from their normalised outputs and
 * log-sum-exps: out = o_w + sigmoid(lse_s - lse_w) * (o_s - o_w), for rows (b, h, g, c) of dv
 * values; each tensor is given with its strides (in floats) over b, h, g and c. */
void kvm_join(int64_t nb, int64_t nh, int64_t ng, int64_t nc, int64_t dv,
              const float *o_w, const int64_t *ow_s, const float *lse_w, const int64_t *lw_s,
              const float *o_s, const int64_t *os_s, const float *lse_s, const int64_t *ls_s,
              float *out, const int64_t *out_s) {
#define AT(t, s) ((t) + ib * (s)[0] + ih * (s)[1] + ig * (s)[2] + ic * (s)[3])
#pragma omp parallel for schedule(static) collapse(4) if (nb * nh * ng * nc >= PARALLEL_ROWS)
    for (int64_t ib = 0; ib < nb; ib++)
        for (int64_t ih = 0; ih < nh; ih++)
            for (int64_t ig = 0; ig < ng; ig++)
                for (int64_t ic = 0; ic < nc; ic++) {
                    const float *xw = AT(o_w, ow_s), *xs = AT(o_s, os_s);
                    float *y = AT(out, out_s);
                    float share = 1.0f / (1.0f + expf(*AT(lse_w, lw_s) - *AT(lse_s, ls_s)));  /* the state's share */
#pragma omp simd
                    for (int64_t j = 0; j < dv; j++) y[j] = xw[j] + share * (xs[j] - xw[j]);
                }
#undef AT
}

/* ---------------------------------------------------------------------------------------------
 * The read of one whole chunk: its queries against the state's slots and their block sliding
 * window, one softmax over both (online, as flash attention), written straight into the output.
 * Three parts, one softmax: the slots, the window keys every query sees (all rows of a task at
 * once: the larger products run faster), and the chunk's own keys, seen causally (QUERY_BLOCK rows
 * at a time, each block stopping at its last visible key: PyTorch's flash kernel on the split path
 * computes that masked half). The parts' logits are scaled by their own temperatures (no scaled
 * copy of the queries) and no merge of two partial softmaxes is needed. Matrix products are BLAS
 * sgemm calls (torch's own MKL, its pointer passed in), inside one OpenMP task per TASK_ROWS query
 * rows of one head, where MKL runs single-threaded.
 */

/* Fortran BLAS sgemm_. Its integers are read through pointers to 64-bit slots: an LP64 BLAS reads
 * their low half (the value, on a little-endian CPU), an ILP64 one the whole, so either works. */
typedef void (*sgemm_fn)(const char *, const char *, const void *, const void *, const void *, const float *,
                         const float *, const void *, const float *, const void *, const float *, float *, const void *);

#ifndef QUERY_BLOCK
#define QUERY_BLOCK 64
#endif
#ifndef KEY_BLOCK
#define KEY_BLOCK 256
#endif
#ifndef TASK_ROWS
#define TASK_ROWS 128
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* exp of 8 floats x <= 0 (a softmax's shifted logits), within 2 ulp; 0 below -87 (and for -inf). */
static inline __m256 exp_nonpositive(__m256 x) {
    __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln2, in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);  /* e^r on [-ln2/2, ln2/2] (Cephes expf) */
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}
#endif

/* Row i of x (n logits) -> exp(x - mx) in place, with mx = max(m, max x); returns the sum. */
static float shifted_exp_row(float *x, int64_t n, float mx) {
    int64_t j = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 mv = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
        _mm256_storeu_ps(x + j, p);
        acc = _mm256_add_ps(acc, p);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int t = 0; t < 8; t++) sum += lanes[t];
#endif
    for (; j < n; j++) {
        x[j] = expf(x[j] - mx);
        sum += x[j];
    }
    return sum;
}

static float row_max(const float *x, int64_t n, float m) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* One softmax part: n keys and values (rows ldk / ldv floats apart), the logits' scale, and the
 * visibility: all keys (last < 0), or key j to query row i iff j <= last + i. */
typedef struct {
    const float *k, *v;
    int64_t ldk, ldv, n, last;
    float scale;
} Part;

/* Rows row0..row0+rows-1 of a chunk's queries q (ldq apart) against one part, folded into their
 * running softmax: max m, sum l and unnormalised output acc (rows x dv). s: scratch for
 * rows x KEY_BLOCK logits. */
static void attend_part(sgemm_fn sgemm, const float *q, int64_t ldq, int64_t rows, int64_t row0, int64_t d,
                        int64_t dv, const Part *pt, float *s, float *acc, float *m, float *l) {
    const float one = 1.0f, zero = 0.0f;
    const int64_t ldk = pt->ldk, ldv = pt->ldv;
    int64_t n = pt->n;
    if (pt->last >= 0 && pt->last + row0 + rows < n) n = pt->last + row0 + rows;  /* keys no row sees */
    for (int64_t k0 = 0; k0 < n; k0 += KEY_BLOCK) {
        int64_t kb = n - k0 < KEY_BLOCK ? n - k0 : KEY_BLOCK;
        /* s (rows x kb, row-major) = scale q k^T, i.e. column-major s^T = scale k q^T */
        sgemm("T", "N", &kb, &rows, &d, &pt->scale, pt->k + k0 * ldk, &ldk, q, &ldq, &zero, s, &kb);
        for (int64_t i = 0; i < rows; i++) {
            float *si = s + i * kb;
            if (pt->last >= 0)
                for (int64_t j = pt->last + row0 + i - k0 + 1 < 0 ? 0 : pt->last + row0 + i - k0 + 1; j < kb; j++)
                    si[j] = -INFINITY;
            float mx = row_max(si, kb, m[i]);
            float carry = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);  /* rescales what came before */
            l[i] = l[i] * carry + shifted_exp_row(si, kb, mx);
            m[i] = mx;
            if (carry != 1.0f)
                for (int64_t c = 0; c < dv; c++) acc[i * dv + c] *= carry;
        }
        /* acc (rows x dv) += p (rows x kb) v (kb x dv), i.e. column-major acc^T += v^T p^T */
        sgemm("N", "N", &dv, &rows, &kb, &one, pt->v + k0 * ldv, &ldv, s, &kb, &one, acc, &dv);
    }
}

/* rows (<= TASK_ROWS) queries q (ldq apart), rows row0.. of their chunk, against the parts -> out
 * (ldo apart): all rows at once against a part every row sees whole, QUERY_BLOCK rows at a time
 * against a masked one (so that each block stops at its own last visible key). Scratch: s
 * (TASK_ROWS x KEY_BLOCK), acc (TASK_ROWS x dv). */
static void attend_rows(sgemm_fn sgemm, const float *q, int64_t ldq, int64_t rows, int64_t row0, int64_t d,
                        int64_t dv, const Part *parts, int n_parts, float *out, int64_t ldo, float *s, float *acc) {
    float m[TASK_ROWS], l[TASK_ROWS];
    for (int64_t i = 0; i < rows; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)(rows * dv));
    for (int ip = 0; ip < n_parts; ip++) {
        int64_t step = parts[ip].last >= 0 ? QUERY_BLOCK : rows;
        for (int64_t i0 = 0; i0 < rows; i0 += step) {
            int64_t sub = rows - i0 < step ? rows - i0 : step;
            attend_part(sgemm, q + i0 * ldq, ldq, sub, row0 + i0, d, dv, &parts[ip], s, acc + i0 * dv, m + i0, l + i0);
        }
    }
    for (int64_t i = 0; i < rows; i++) {
        float inv = 1.0f / l[i];
        for (int64_t c = 0; c < dv; c++) out[i * ldo + c] = acc[i * dv + c] * inv;
    }
}

/* The read of whole chunks of c queries of nb x hq heads: q (rows q + b*q_s[0] + h*q_s[1] + i*q_s[2])
 * against the slots of their kv head h / groups (sk, sv; n_slots rows) and its window (wk, wv; w_len
 * rows: query row i sees window keys j <= w_len - c + i), logits scaled by state_scale[h] and
 * window_scale[h] -> out (rows as q's). Each tensor comes with its strides over (b, h, row), in
 * floats. */
typedef struct {
    const float *q, *sk, *sv, *wk, *wv, *state_scale, *window_scale;
    float *out;
    const int64_t *q_s, *sk_s, *sv_s, *wk_s, *wv_s, *out_s;
    int64_t groups, c, d, dv, n_slots, w_len;
} ChunkRead;

/* Query rows block*TASK_ROWS.. (at most TASK_ROWS) of batch row ib, query head ih. Scratch as
 * ``attend_rows``. */
static void read_block(sgemm_fn sgemm, const ChunkRead *cr, int64_t ib, int64_t ih, int64_t block, float *s,
                       float *acc) {
    int64_t c = cr->c, hk = ih / cr->groups, row0 = block * TASK_ROWS;
    int64_t rows = c - row0 < TASK_ROWS ? c - row0 : TASK_ROWS;
    const int64_t *wk_s = cr->wk_s, *wv_s = cr->wv_s;
    const float *wkh = cr->wk + ib * wk_s[0] + hk * wk_s[1], *wvh = cr->wv + ib * wv_s[0] + hk * wv_s[1];
    int64_t seen = cr->w_len - c;  /* window keys every row sees; then c keys seen causally */
    Part parts[3] = {
        {cr->sk + ib * cr->sk_s[0] + hk * cr->sk_s[1], cr->sv + ib * cr->sv_s[0] + hk * cr->sv_s[1], cr->sk_s[2],
         cr->sv_s[2], cr->n_slots, -1, cr->state_scale[ih]},
        {wkh, wvh, wk_s[2], wv_s[2], seen, -1, cr->window_scale[ih]},
        {wkh + seen * wk_s[2], wvh + seen * wv_s[2], wk_s[2], wv_s[2], c, 0, cr->window_scale[ih]},
    };
    attend_rows(sgemm, cr->q + ib * cr->q_s[0] + ih * cr->q_s[1] + row0 * cr->q_s[2], cr->q_s[2], rows, row0, cr->d,
                cr->dv, parts, 3, cr->out + ib * cr->out_s[0] + ih * cr->out_s[1] + row0 * cr->out_s[2], cr->out_s[2],
                s, acc);
}

/* The read of one whole chunk (``ChunkRead``), one task per TASK_ROWS rows of a query head. Returns
 * 0, or -1 if out of memory. */
int kvm_attend_chunks(void *sgemm_ptr, int64_t nb, int64_t hq, int64_t groups, int64_t c, int64_t d, int64_t dv,
                      const float *q, const int64_t *q_s, const float *sk, const int64_t *sk_s, const float *sv,
                      const int64_t *sv_s, int64_t n_slots, const float *wk, const int64_t *wk_s, const float *wv,
                      const int64_t *wv_s, int64_t w_len, const float *state_scale, const float *window_scale,
                      float *out, const int64_t *out_s) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const ChunkRead cr = {q, sk, sv, wk, wv, state_scale, window_scale, out, q_s, sk_s, sv_s, wk_s, wv_s, out_s,
                          groups, c, d, dv, n_slots, w_len};
    int64_t blocks = (c + TASK_ROWS - 1) / TASK_ROWS;
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * TASK_ROWS * KEY_BLOCK), *acc = malloc(sizeof(float) * TASK_ROWS * (size_t)dv);
        if (!s || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic) collapse(3)
        for (int64_t ib = 0; ib < nb; ib++)
            for (int64_t ih = 0; ih < hq; ih++)
                for (int64_t jq = 0; jq < blocks; jq++)  /* a head's last rows first: they see the most keys */
                    if (s && acc) read_block(sgemm, &cr, ib, ih, blocks - 1 - jq, s, acc);
        free(s);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * The whole boundary update in one call: the routing scores of ROUTE_ROWS slots at a time against
 * the chunk's tokens (one sgemm into per-thread scratch, which stays in cache) reduced at once to
 * each token's running best, so the S x C score matrix never exists; the rest as the kernels above.
 */
#ifndef ROUTE_ROWS
#define ROUTE_ROWS 128
#endif

/* Token order by (novelty, index): a stable ascending argsort, as torch's. */
typedef struct {
    float novelty;
    int64_t token;
} Ranked;

static int by_novelty(const void *a, const void *b) {
    const Ranked *x = a, *y = b;
    if (x->novelty != y->novelty) return x->novelty < y->novelty ? -1 : 1;
    return (x->token > y->token) - (x->token < y->token);
}

/* Per-thread scratch of ``kvm_absorb`` for a chunk of c tokens and up to `total` slots after it. */
typedef struct {
    float *ku, *gated, *tokens, *scores, *every, *best, *every_new, *best_new;
    int32_t *index, *index_new;
    int64_t *target, *row_of, *start, *order;
    char *appends;
    Ranked *ranked;
} AbsorbScratch;

static int absorb_scratch(AbsorbScratch *a, int64_t c, int64_t d, int64_t f, int64_t r, int64_t total) {
    a->ku = malloc(sizeof(float) * (size_t)(c * d));
    a->gated = malloc(sizeof(float) * (size_t)(c * f));
    a->tokens = malloc(sizeof(float) * (size_t)(c * r));
    a->scores = malloc(sizeof(float) * (size_t)(ROUTE_ROWS * c));
    a->every = malloc(sizeof(float) * (size_t)(4 * c));
    a->index = malloc(sizeof(int32_t) * (size_t)(2 * c));
    a->target = malloc(sizeof(int64_t) * (size_t)(3 * c));
    a->start = malloc(sizeof(int64_t) * (size_t)(total + 1));
    a->appends = malloc((size_t)c);
    a->ranked = malloc(sizeof(Ranked) * (size_t)c);
    if (!(a->ku && a->gated && a->tokens && a->scores && a->every && a->index && a->target && a->start && a->appends
          && a->ranked))
        return 0;
    a->best = a->every + c, a->every_new = a->every + 2 * c, a->best_new = a->every + 3 * c;
    a->index_new = a->index + c;
    a->row_of = a->target + c, a->order = a->target + 2 * c;
    return 1;
}

static void absorb_scratch_free(AbsorbScratch *a) {
    free(a->ku);
    free(a->gated);
    free(a->tokens);
    free(a->scores);
    free(a->every);
    free(a->index);
    free(a->target);
    free(a->start);
    free(a->appends);
    free(a->ranked);
}

/* The routing of c tokens (features tokens, c x r) among n slots (features slots, n x r), as
 * ``kvm_route`` of their scores with init: scored ROUTE_ROWS slots at a time into scratch
 * `scores`, each block reduced at once (``route_rows``). */
static void route_tokens(sgemm_fn sgemm, const float *tokens, int64_t c, int64_t r, const float *slots, int64_t n,
                         int64_t skip, float *scores, float *every, float *best, int32_t *index) {
    const float one = 1.0f, zero = 0.0f;
    route_init(c, every, best, index);
    for (int64_t lo = 0; lo < n; lo += ROUTE_ROWS) {
        int64_t rows = n - lo < ROUTE_ROWS ? n - lo : ROUTE_ROWS;
        /* scores (rows x c, row-major) = slots tokens^T, i.e. column-major scores^T = tokens slots^T */
        sgemm("T", "N", &(int64_t){c}, &(int64_t){rows}, &(int64_t){r}, &one, tokens, &(int64_t){r}, slots + lo * r,
              &(int64_t){r}, &zero, scores, &(int64_t){c});
        route_rows(scores, c, rows, c, lo, skip, every, best, index);
    }
    route_finish(c, every, best);
}

/* Step 3 of ``kvm_absorb`` for one head: the n_append most novel tokens (lowest novelty; ties: the
 * earlier token) become slots num.. in token order, and the others route against those too (a new
 * slot wins where it scores strictly higher than the token's winner). Leaves in a.target / a.row_of
 * the m merges (slot, token) in token order; returns m. */
static int64_t append_most_novel(sgemm_fn sgemm, AbsorbScratch *a, int64_t c, int64_t d, int64_t dv, int64_t z,
                                 int64_t r, int64_t num, int64_t n_append, const float *vh, int64_t v_sc,
                                 int gate_appends, int use_vlens, const float *w, const float *b, float eps,
                                 int reduced, float *hs, float *hl, float *hk, float *hv, float *hf) {
    int64_t f = d + dv, m = 0;
    for (int64_t ic = 0; ic < c; ic++) a->ranked[ic] = (Ranked){a->every[ic], ic};
    qsort(a->ranked, (size_t)c, sizeof(Ranked), by_novelty);
    for (int64_t ic = 0; ic < c; ic++) a->appends[ic] = 0;
    for (int64_t i = 0; i < n_append; i++) a->appends[a->ranked[i].token] = 1;
    for (int64_t ic = 0, slot = num; ic < c; ic++) {
        if (!a->appends[ic]) continue;
        float *y = hs + slot * f;
        if (gate_appends) {
            memcpy(y, a->gated + ic * f, sizeof(float) * (size_t)f);
        } else {
            memcpy(y, a->ku + ic * d, sizeof(float) * (size_t)d);
            memcpy(y + d, vh + ic * v_sc, sizeof(float) * (size_t)dv);
        }
        hl[slot] = use_vlens ? sqrtf(dot_f(y + d, y + d, dv)) : 1.0f;
        read_row(y, hl[slot], d, dv, z, w, b, eps, use_vlens, reduced, hk + slot * d, hv + slot * dv, hf + slot * r);
        slot++;
    }
    route_tokens(sgemm, a->tokens, c, r, hf + num * r, n_append, 0, a->scores, a->every_new, a->best_new,
                 a->index_new);
    for (int64_t ic = 0; ic < c; ic++) {
        if (a->appends[ic]) continue;
        a->target[m] = a->best_new[ic] > a->best[ic] ? num + a->index_new[ic] : a->target[ic];
        a->row_of[m++] = ic;
    }
    return m;
}

/* What a boundary update needs besides its chunk: sizes, the state-key norm (w, b, eps; inv_ww as
 * ``inverse_sq_norm``), the options and the room: sums (heads, cap, d + dv), lens (heads, cap),
 * read_keys, read_values, feat as in ``kvm_merge_read``. */
typedef struct {
    int64_t c, d, dv, z, r, skip, cap;
    const float *w, *b;
    float eps, inv_ww;
    int gate_keys, gate_values, reduced, gate_appends, use_vlens;
    float *sums, *lens, *read_keys, *read_values, *feat;
} Update;

/* A whole boundary update of one head (room rows head * cap..) holding num slots, in cache from
 * start to end; equal to the PyTorch update of blocks/kvm/inference.py (and to
 * kvm_incoming, routing as kvm_route, kvm_merge_read in turn), without their (N, H, C, *)
 * intermediates in memory:
 *  1. the chunk's tokens, rows of kh, vh, gh (k_sc, v_sc, g_sc floats apart; gh: one gate per
 *     token) prepared by ``prepare_token`` into the scratch;
 *  2. each routed among the num slots: its novelty (best score over all) and its winner (the best
 *     slot >= skip);
 *  3. ``append_most_novel`` if n_append > 0: appended slots take the gated key | value if
 *     gate_appends, else the prepared key | raw value, and the value's norm as length with vlens,
 *     else 1;
 *  4. the other tokens merge (``merge_read_head``), which re-reads every touched and new slot. */
static void absorb_head(sgemm_fn sgemm, const Update *u, AbsorbScratch *a, int64_t head, const float *kh,
                        int64_t k_sc, const float *vh, int64_t v_sc, const float *gh, int64_t g_sc, int64_t num,
                        int64_t n_append) {
    int64_t c = u->c, d = u->d, dv = u->dv, z = u->z, r = u->r, f = d + dv, cap = u->cap;
    float *hs = u->sums + head * cap * f, *hl = u->lens + head * cap, *hk = u->read_keys + head * cap * d;
    float *hv = u->read_values + head * cap * dv, *hf = u->feat + head * cap * r;
    int keep_keys = n_append > 0 && !u->gate_appends;  /* appends take the ungated prepared key */
    for (int64_t ic = 0; ic < c; ic++)
        prepare_token(kh + ic * k_sc, vh + ic * v_sc, gh[ic * g_sc], d, dv, z, u->w, u->b, u->eps, u->gate_keys,
                      u->gate_values, u->reduced, u->inv_ww, keep_keys ? a->ku + ic * d : a->gated + ic * f,
                      a->gated + ic * f, a->tokens + ic * r);
    route_tokens(sgemm, a->tokens, c, r, hf, num, u->skip, a->scores, a->every, a->best, a->index);
    for (int64_t ic = 0; ic < c; ic++) a->target[ic] = a->index[ic];
    int64_t m = n_append ? append_most_novel(sgemm, a, c, d, dv, z, r, num, n_append, vh, v_sc, u->gate_appends,
                                             u->use_vlens, u->w, u->b, u->eps, u->reduced, hs, hl, hk, hv, hf)
                         : c;
    merge_read_head(m, num + n_append, num, d, dv, z, a->target, a->gated, n_append ? a->row_of : NULL,
                    !u->use_vlens, hs, hl, u->w, u->b, u->eps, u->use_vlens, u->reduced, hk, hv, hf, a->start,
                    a->order);
}

static Update update_args(int64_t c, int64_t d, int64_t dv, int64_t z, const float *w, const float *b, float eps,
                          int gate_keys, int gate_values, int reduced, int64_t skip, int gate_appends, int use_vlens,
                          int64_t cap, float *sums, float *lens, float *read_keys, float *read_values, float *feat) {
    return (Update){c, d, dv, z, reduced ? d - z + 2 : d, skip, cap, w, b, eps, reduced ? inverse_sq_norm(w, z) : 1.0f,
                    gate_keys, gate_values, reduced, gate_appends, use_vlens, sums, lens, read_keys, read_values, feat};
}

/* A whole boundary update (``absorb_head``) of n x h heads, one task per head: the chunk's (N, H, C)
 * rows of k, v, g by strides (as in ``kvm_incoming``), n_append of them appended to the num slots.
 * Returns 0, or -1 if out of memory. */
int kvm_absorb(void *sgemm_ptr, int64_t n, int64_t h, int64_t c, int64_t d, int64_t dv, int64_t z,
               const float *k, const int64_t *k_s, const float *v, const int64_t *v_s, const float *g,
               const int64_t *g_s, const float *w, const float *b, float eps, int gate_keys, int gate_values,
               int reduced, int64_t skip, int64_t n_append, int gate_appends, int use_vlens, int64_t cap,
               int64_t num, float *sums, float *lens, float *read_keys, float *read_values, float *feat) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const Update u = update_args(c, d, dv, z, w, b, eps, gate_keys, gate_values, reduced, skip, gate_appends,
                                 use_vlens, cap, sums, lens, read_keys, read_values, feat);
    int failed = 0;
#pragma omp parallel if (n * h * c >= PARALLEL_ROWS)
    {
        AbsorbScratch a = {0};
        int ready = absorb_scratch(&a, c, d, d + dv, u.r, num + n_append);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t in = 0; in < n; in++)
            for (int64_t ih = 0; ih < h; ih++)
                if (ready)
                    absorb_head(sgemm, &u, &a, in * h + ih, k + in * k_s[0] + ih * k_s[1], k_s[2],
                                v + in * v_s[0] + ih * v_s[1], v_s[2], g + in * g_s[0] + ih * g_s[1], g_s[2], num,
                                n_append);
        absorb_scratch_free(&a);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Whole chunks in a row in one call: each chunk's boundary update (if it has one), then its read.
 * One graph of OpenMP tasks, not a parallel region per step: per kv head, update j waits for the
 * reads of the chunks before it (they read the slots it changes) and the reads of chunk j wait for
 * update j; other heads' tasks run meanwhile. So no thread idles at a barrier between the steps,
 * and no step returns to Python.
 */

/* Per-thread scratch of ``kvm_run_chunks``: an update's and a read's. */
typedef struct {
    AbsorbScratch update;
    float *logits, *acc;
} RunScratch;

static void run_scratch_free(RunScratch *scratch, int threads) {
    for (int t = 0; scratch && t < threads; t++) {
        absorb_scratch_free(&scratch[t].update);
        free(scratch[t].logits);
        free(scratch[t].acc);
    }
    free(scratch);
}

/* n_chunks whole chunks of c queries, in order, for nb batch rows of hq query heads on hkv kv heads:
 * chunk j's queries are rows j*c.. of q, its outputs rows j*c.. of out, its window the w_len rows
 * from row j*c of the raw tokens k, v (so the c tokens before that row are the ones leaving the
 * window at its boundary), g their gates. Chunk j first runs its boundary update (``absorb_head``,
 * appends[j] of them appended) unless appends[j] < 0, then its read (``read_block``) against the
 * room's slots, num of them at the start. Strides over (b, h, row) in floats; logit scales, the
 * state-key norm, the options and the room as ``kvm_attend_chunks`` and ``kvm_absorb``. Returns 0,
 * or -1 if out of memory (then nothing was changed). */
int kvm_run_chunks(void *sgemm_ptr, int64_t nb, int64_t hq, int64_t hkv, int64_t c, int64_t d, int64_t dv, int64_t z,
                   int64_t n_chunks, const int64_t *appends, int64_t num, const float *q, const int64_t *q_s,
                   float *out, const int64_t *out_s, const float *k, const int64_t *k_s, const float *v,
                   const int64_t *v_s, const float *g, const int64_t *g_s, int64_t w_len, const float *state_scale,
                   const float *window_scale, const float *w, const float *b, float eps, int gate_keys,
                   int gate_values, int reduced, int64_t skip, int gate_appends, int use_vlens, int64_t cap,
                   float *sums, float *lens, float *read_keys, float *read_values, float *feat) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const Update u = update_args(c, d, dv, z, w, b, eps, gate_keys, gate_values, reduced, skip, gate_appends,
                                 use_vlens, cap, sums, lens, read_keys, read_values, feat);
    const int64_t slot_keys_s[3] = {hkv * cap * d, cap * d, d}, slot_values_s[3] = {hkv * cap * dv, cap * dv, dv};
    const int64_t heads = nb * hkv, groups = hq / hkv, blocks = (c + TASK_ROWS - 1) / TASK_ROWS;
    const int threads = omp_get_max_threads();
    RunScratch *scratch = calloc((size_t)threads, sizeof(RunScratch));
    char *head_order = calloc((size_t)heads, 1);  /* a dependence per kv head: the addresses are what counts */
    int ready = scratch && head_order;
    for (int t = 0; ready && t < threads; t++) {
        scratch[t].logits = malloc(sizeof(float) * TASK_ROWS * KEY_BLOCK);
        scratch[t].acc = malloc(sizeof(float) * TASK_ROWS * (size_t)dv);
        ready = absorb_scratch(&scratch[t].update, c, d, d + dv, u.r, cap) && scratch[t].logits && scratch[t].acc;
    }
    if (ready) {
#pragma omp parallel
#pragma omp single
        for (int64_t j = 0; j < n_chunks; j++) {
            int64_t before = num;
            if (appends[j] > 0) num += appends[j];
            const ChunkRead cr = {q + j * c * q_s[2], read_keys, read_values, k + j * c * k_s[2], v + j * c * v_s[2],
                                  state_scale, window_scale, out + j * c * out_s[2], q_s, slot_keys_s,
                                  slot_values_s, k_s, v_s, out_s, groups, c, d, dv, num, w_len};
            for (int64_t head = 0; head < heads; head++) {
                int64_t in = head / hkv, ih = head % hkv, n_append = appends[j];
                if (n_append >= 0) {
                    int64_t leaving = j * c - c;  /* the row of the first token leaving the window */
                    const float *kh = k + in * k_s[0] + ih * k_s[1] + leaving * k_s[2];
                    const float *vh = v + in * v_s[0] + ih * v_s[1] + leaving * v_s[2];
                    const float *gh = g + in * g_s[0] + ih * g_s[1] + leaving * g_s[2];
#pragma omp task depend(inout : head_order[head])
                    absorb_head(sgemm, &u, &scratch[omp_get_thread_num()].update, head, kh, k_s[2], vh, v_s[2], gh,
                                g_s[2], before, n_append);
                }
                for (int64_t ig = 0; ig < groups; ig++)
                    for (int64_t jq = 0; jq < blocks; jq++) {  /* a head's last rows first: they see the most keys */
                        int64_t query_head = ih * groups + ig, block = blocks - 1 - jq;
#pragma omp task depend(in : head_order[head])
                        {
                            RunScratch *mine = &scratch[omp_get_thread_num()];
                            read_block(sgemm, &cr, in, query_head, block, mine->logits, mine->acc);
                        }
                    }
            }
        }
    }
    run_scratch_free(scratch, threads);
    free(head_order);
    return ready ? 0 : -1;
}
