/* The native sampler: each row of a step's logits in a few passes while it sits in cache.

   `sample(logits, temperature, top_k, top_p, min_p, seed, position, banned_ids, top_counts,
   tokens, logprobs, lse, top_ids, top_logprobs, lost)` samples every row of float32 `logits`
   [B, V] (rows with a repetition penalty excepted: server/native_sampler.py sends those to the
   sampler graph) and writes each row's results into the output buffers. It releases the GIL
   while it runs.

   Why native: onnxruntime's and numpy's ops each make one memory pass over [B, V], and the
   sampler graph made about ten of them (pad, ban scatter, softmax, block sums, ...), 18 to 21
   us of a 64-row step's CPU per token. Here a plain row (a temperature and bans) is read twice
   while it sits in the L1/L2 cache: once for its maximum, once for the exponentials, their
   block sums and the log-sum-exp. A filtered row (top-k, top-p, min-p) also finds its floor,
   the highest of its filters' thresholds (see "top-k, top-p and min-p" below), and draws from
   the weights above it, relative to its best allowed logit, as numpy's general path does.

   The draw is the numpy `Sampler`'s (server/sampling.py) from each row's uniform of its
   counter-based stream (the same bits as server/sampler.py's stream_uniforms), so both give the
   same ids except where rounding puts the uniform on a boundary:

     weights  w_i = exp((l_i - max) / T), 0 for banned ids and   (T = 0: argmax, no draw)
              those below the floor
     blocks   of BLOCK ids:  s_b = sum of the block's w_i (float32), cum_b = running sum (double)
     target   t = u * cum_last;  block b = number of cum_b <= t (clamped to the last block)
     index    first i of block b with cum_{b-1} + w_start + ... + w_i > t
     lse      max + log(sum over ALL ids of exp(l_i - max)): the unmodified distribution

   A row whose allowed weights all underflow (a banned id holds nearly all the mass) is flagged
   in `lost` and left to the general sampler, as numpy's short path does. Rounding that steps
   past a block's last weighted id takes the row's best allowed id instead.

   The exponential is a table of 2^(j/16) and a cubic on the target's vector lanes (GCC vector
   extensions; see LANES below). Relative error below 2e-7, like the libm's. (Taking each block's
   maximum in the same pass instead of the row's first was measured slower: 0.39 against 0.34
   ms a 64-row step, the blocks' maxima serialise what the separate passes pipeline.) */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#define BLOCK 128
#define MAX_BLOCKS 65536 /* vocabularies up to 8M ids */
/* The vector width is the compiler's target's: setup.py builds this file once per x86-64
   level (the baseline, x86-64-v3 with AVX2, x86-64-v4 with AVX-512; MODULE_NAME names each)
   and server/fastsample.py loads the best one the CPU runs. (GCC's target_clones, which this
   file used before, compiled the always-inline vector helpers for the baseline before inlining
   them: the AVX2 and baseline clones came out lane by lane, 8 times slower than these.) */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
/* The x86-64 level this build was compiled for (1: the baseline, or any other machine). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LEVEL 4
#elif defined(__AVX2__) && defined(__FMA__)
#define LEVEL 3
#else
#define LEVEL 1
#endif

#ifndef MODULE_NAME
#define MODULE_NAME _fastsample
#endif
#define JOIN_(a, b) a##b
#define JOIN(a, b) JOIN_(a, b)
#define TEXT_(a) #a
#define TEXT(a) TEXT_(a)

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline __attribute__((always_inline)) vf splat(float x) { return (vf){0} + x; }

static inline __attribute__((always_inline)) vf select_lt(vf a, vf b, vf yes, vf no) {
    vi m = a < b;
    return (vf)(((vi)yes & m) | ((vi)no & ~m));
}

/* 2^(j/16), j = 0..15: the table of the exponential below. */
static const float EXP2_SIXTEENTHS[16] = {
    1.0f,        1.04427378f, 1.09050773f, 1.13878863f, 1.18920712f, 1.24185781f,
    1.29683955f, 1.35425555f, 1.41421356f, 1.47682615f, 1.54221083f, 1.61049033f,
    1.68179283f, 1.75625216f, 1.83400809f, 1.91520656f};

/* EXP2_SIXTEENTHS[j] for each lane's j in 0..15: one permute of the table held in one (16
   lanes) or two (8 lanes) registers; a load per lane on narrower targets. */
static inline __attribute__((always_inline)) vf exp2_sixteenths(vi j) {
#if LANES == 16
    vf table;
    memcpy(&table, EXP2_SIXTEENTHS, sizeof table);
    return __builtin_shuffle(table, j);
#elif LANES == 8
    vf low, high;
    memcpy(&low, EXP2_SIXTEENTHS, sizeof low);
    memcpy(&high, EXP2_SIXTEENTHS + 8, sizeof high);
    return __builtin_shuffle(low, high, j);
#else
    vf out;
    for (int k = 0; k < LANES; k++) out[k] = EXP2_SIXTEENTHS[j[k]];
    return out;
#endif
}

/* exp(x) for x <= 0 on every lane; 0 below -87 (no subnormals); relative error below 2e-7.
   x = (16 e + j) ln2/16 + r with |r| <= ln2/32: exp(x) = 2^e * 2^(j/16) * exp(r), exp(r) a
   cubic (its error 1e-8), 2^(j/16) from the table, 2^e added to the exponent. */
static inline __attribute__((always_inline)) vf vexp(vf x) {
    vi under = x < splat(-87.0f);
    x = select_lt(x, splat(-87.0f), splat(-87.0f), x);
    vf t = x * 23.0831206542233f + 12582912.0f; /* round(x * 16 / ln 2) in the low bits */
    vf k = t - 12582912.0f;
    vi ki = (vi)t - 0x4B400000;
    vf r = x - k * 0.0433349609375f; /* ln 2 / 16 in two parts: k * the first is exact */
    r = r - k * -1.3262152e-05f;
    vf p = r * (1.0f / 6.0f) + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits = (vi)(p * exp2_sixteenths(ki & 15)) + ((ki >> 4) << 23);
    return (vf)(bits & ~under);
}

static float exp_one(float x) { return vexp(splat(x))[0]; } /* x <= 0 */

/* The lanes' sum, halving: the two halves added, then their halves, ... */
static inline __attribute__((always_inline)) float hsum(vf v) {
#if LANES == 16
    typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
    vf8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif LANES == 8
    vf h8 = v;
#endif
#if LANES >= 8
    typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
    vf4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#else
    vf h4 = v;
#endif
    return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

static inline __attribute__((always_inline)) vf load(const float *x, int64_t i, int64_t end) {
    if (i + LANES <= end) {
        vf v;
        memcpy(&v, x + i, sizeof v);
        return v;
    }
    vf v = splat(-INFINITY);
    for (int64_t k = 0; i + k < end; k++) v[k] = x[i + k];
    return v;
}

/* The row's maximum; NaNs are skipped (a row of NaNs gives -inf). */
static inline __attribute__((always_inline)) vf max_of(vf acc, vf v) {
    vi gt = v > acc;
    return (vf)(((vi)v & gt) | ((vi)acc & ~gt));
}

/* The row's maximum; NaNs are skipped (a row of NaNs gives -inf). Four running maxima, so
   that each compare waits for the one four vectors back, not the last. */
static float row_max(const float *x, int64_t n) {
    vf a0 = splat(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        a0 = max_of(a0, load(x, i, n));
        a1 = max_of(a1, load(x, i + LANES, n));
        a2 = max_of(a2, load(x, i + 2 * LANES, n));
        a3 = max_of(a3, load(x, i + 3 * LANES, n));
    }
    for (; i < n; i += LANES) a0 = max_of(a0, load(x, i, n));
    vf acc = max_of(max_of(a0, a1), max_of(a2, a3));
    float m = -INFINITY;
    for (int k = 0; k < LANES; k++) m = acc[k] > m ? acc[k] : m;
    return m;
}

/* Block sums of exp((x - m) * scale) into sums[], and their total in double; only ids with
   x >= floor count (floor = -inf: all). */
static double block_sums(const float *x, int64_t n, float m, float scale, float floor,
                                    float *sums) {
    double total = 0.0;
    for (int64_t b = 0, start = 0; start < n; b++, start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        vf acc = {0};
        if (floor == -INFINITY) {
            for (int64_t i = start; i < end; i += LANES) acc += vexp((load(x, i, end) - m) * scale);
        } else {
            for (int64_t i = start; i < end; i += LANES) {
                vf v = load(x, i, end);
                acc += (vf)((vi)vexp((v - m) * scale) & (v >= floor));
            }
        }
        sums[b] = hsum(acc);
        total += sums[b];
    }
    return total;
}

/* A row's banned ids are sorted and in the vocabulary (`sample` checks them); `n_banned` is
   how many there are. The first index of banned[] holding an id >= `id`: */
static int64_t first_ban_from(const int64_t *banned, int64_t n_banned, int64_t id) {
    int64_t lo = 0, hi = n_banned;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (banned[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int is_banned(const int64_t *banned, int64_t n_banned, int64_t id) {
    int64_t j = first_ban_from(banned, n_banned, id);
    return j < n_banned && banned[j] == id;
}

/* w[i - start] = exp((x[i] - m) * scale) for the ids of one block, 0 for banned ones and
   those below `floor`. */
static void block_weights(const float *x, int64_t start, int64_t end, float m, float scale,
                          float floor, const int64_t *banned, int64_t n_banned, float *w) {
    for (int64_t i = start; i < end; i += LANES) {
        vf v = load(x, i, end);
        vf e = (vf)((vi)vexp((v - m) * scale) & (v >= floor));
        for (int64_t k = 0; k < LANES && i + k < end; k++) w[i + k - start] = e[k];
    }
    for (int64_t j = first_ban_from(banned, n_banned, start); j < n_banned && banned[j] < end; j++)
        w[banned[j] - start] = 0.0f;
}

/* The allowed id with the largest logit, lowest id on ties; -1 if none. */
static int64_t best_allowed(const float *x, int64_t n, const int64_t *banned, int64_t n_banned) {
    int64_t best = -1;
    float bv = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if ((best < 0 || x[i] > bv) && x[i] == x[i] && !is_banned(banned, n_banned, i)) {
            best = i;
            bv = x[i];
        }
    }
    return best;
}

/* Greedy: the first id holding the row's maximum `m`, unless it is banned. */
static int64_t greedy(const float *x, int64_t n, float m, const int64_t *banned, int64_t n_banned) {
    int64_t i = 0;
    while (i < n && x[i] != m) i++;
    if (i < n && !is_banned(banned, n_banned, i)) return i;
    return best_allowed(x, n, banned, n_banned);
}

/* ---- the k largest of a row: a row's reported alternatives (`top_logprobs`, not the top-k
   filter) and a word model's suggestions (`top_k`, server/words.py top_ids) -------------- */

/* Whether any lane of `v` is above `t`: one compare into a mask (GCC turns an OR of the lanes
   of a compare's result into a lane-by-lane extract). */
static inline __attribute__((always_inline)) int any_above(vf v, float t) {
#if LANES == 16
    return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
#elif LANES == 8
    return _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_set1_ps(t), _CMP_GT_OQ)) != 0;
#elif defined(__SSE__)
    return _mm_movemask_ps(_mm_cmpgt_ps((__m128)v, _mm_set1_ps(t))) != 0;
#else
    for (int k = 0; k < LANES; k++)
        if (v[k] > t) return 1;
    return 0;
#endif
}

/* Insert (v, i) into the `*have` largest so far, vals[0..k) descending (ties: the earlier id
   first, as ids arrive in order). NaNs are never kept. */
#define TOP_INSERT(T)                                                                           \
    static inline __attribute__((always_inline)) void top_insert_##T(T v, int64_t i, int64_t k, \
                                                                    int64_t *have, int64_t *ids, \
                                                                    T *vals) {                  \
        if (v != v || (*have == k && !(v > vals[k - 1]))) return;                               \
        int64_t j = *have < k ? (*have)++ : k - 1;                                              \
        while (j > 0 && v > vals[j - 1]) {                                                      \
            vals[j] = vals[j - 1];                                                              \
            ids[j] = ids[j - 1];                                                                \
            j--;                                                                                \
        }                                                                                       \
        vals[j] = v;                                                                            \
        ids[j] = i;                                                                             \
    }
TOP_INSERT(float)
TOP_INSERT(double)

/* The k largest (k >= 1) of float32 x[0..n), largest first, ties by the lower id; returns how
   many (fewer than k only when x holds fewer than k values that are not NaN). Sixteen values
   at a time are compared with the k-th so far: once k are held, few blocks hold a larger one. */
static int64_t top_k_float(const float *x, int64_t n, int64_t k, int64_t *ids,
                                      float *vals) {
    int64_t have = 0;
    for (int64_t i = 0; i < n; i += LANES) {
        if (have == k && !any_above(load(x, i, n), vals[k - 1])) continue;
        int64_t end = i + LANES < n ? i + LANES : n;
        for (int64_t j = i; j < end; j++) top_insert_float(x[j], j, k, &have, ids, vals);
    }
    return have;
}

static int64_t top_k_double(const double *x, int64_t n, int64_t k, int64_t *ids, double *vals) {
    int64_t have = 0;
    for (int64_t i = 0; i < n; i++) top_insert_double(x[i], i, k, &have, ids, vals);
    return have;
}

/* The weights a row draws from: w_i = exp((x_i - m) * scale) for allowed ids with
   x_i >= floor, 0 for the others. */
typedef struct {
    float m, scale, floor;
} Weights;

/* The weights' block sums with banned ids taken out, and their total. `sums` holds the block
   sums of exp(x - sums_m) over all ids (the log-sum-exp's): reused when the weights are
   those, else recomputed. */
static double allowed_sums(const float *x, int64_t n, Weights wt, float sums_m,
                           const int64_t *banned, int64_t n_banned, float *sums) {
    if (wt.scale != 1.0f || wt.floor != -INFINITY || wt.m != sums_m)
        block_sums(x, n, wt.m, wt.scale, wt.floor, sums);
    float w[BLOCK];
    for (int64_t j = 0, last = -1; j < n_banned; j++) { /* banned ids weigh nothing */
        int64_t b = banned[j] / BLOCK, start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
        if (b == last) continue; /* the block is summed again once, whatever its bans */
        last = b;
        block_weights(x, start, end, wt.m, wt.scale, wt.floor, banned, n_banned, w);
        float s = 0.0f;
        for (int64_t i = 0; i < end - start; i++) s += w[i];
        sums[b] = s;
    }
    double total = 0.0;
    for (int64_t b = 0; b < (n + BLOCK - 1) / BLOCK; b++) total += sums[b];
    return total;
}

/* The drawn id of one row (-1: its allowed weights underflowed; see the top), from the
   weights' block sums in `sums` (see `allowed_sums`). */
static int64_t draw(const float *x, int64_t n, Weights wt, double u, const int64_t *banned,
                    int64_t n_banned, const float *sums, double *cum) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double c = 0.0;
    for (int64_t b = 0; b < blocks; b++) cum[b] = c += sums[b];
    if (!(c >= 1e-20)) return -1;
    double t = u * c;
    int64_t b = 0;
    while (b < blocks - 1 && cum[b] <= t) b++;
    int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n, i = 0;
    float w[BLOCK];
    block_weights(x, start, end, wt.m, wt.scale, wt.floor, banned, n_banned, w);
    double running = b ? cum[b - 1] : 0.0;
    for (; i < end - start; i++) {
        running += w[i];
        if (running > t) break;
    }
    if (i < end - start && w[i] > 0.0f) return start + i;
    return best_allowed(x, n, banned, n_banned); /* rounding stepped past the weighted ids */
}

/* ---- top-k, top-p and min-p ------------------------------------------------------------
   The filters of server/sampling.py (vLLM's): top-k, then top-p over the top-k-renormalised
   distribution, then min-p, each a threshold on the row's logits (bans at -inf), ties at a
   threshold kept. Top-k and top-p read the row's W largest logits, sorted (W = top_k, at
   least HEAD when top_p < 1); a nucleus wider than them is found again from the whole row. */

#define HEAD 256

static int desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Moves the `w` largest of buf[0..n) to buf[n-w..n) (any order): quickselect, and a sort
   after 64 rounds (no adversarial row takes quadratic time). */
static void largest(float *buf, int64_t n, int64_t w) {
    int64_t lo = 0, hi = n - 1, kth = n - w;
    for (int round = 0; lo < hi; round++) {
        if (round == 64) {
            qsort(buf + lo, hi - lo + 1, sizeof(float), desc);
            for (int64_t i = lo, j = hi; i < j; i++, j--) { /* ascending */
                float t = buf[i];
                buf[i] = buf[j];
                buf[j] = t;
            }
            return;
        }
        int64_t mid = lo + (hi - lo) / 2;
        float a = buf[lo], b = buf[mid], c = buf[hi];
        float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (buf[i] < pivot) i++;
            while (buf[j] > pivot) j--;
            if (i <= j) {
                float t = buf[i];
                buf[i++] = buf[j];
                buf[j--] = t;
            }
        }
        if (kth <= j) hi = j;
        else if (kth >= i) lo = i;
        else return;
    }
}

static inline uint32_t order_key(float f) { /* unsigned keys in the floats' order */
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

/* The w largest of buf[0..n) (w <= n), largest first, into vals; buf is reordered. Radix
   select on the keys' bits, 11 at a time: a histogram finds the bucket holding the w-th
   largest, what is above it is taken, the bucket's items are kept for the next digit;
   `largest` finishes what two digits leave (ties of one value, or few items). */
static void top_values(float *buf, int64_t n, int64_t w, float *vals) {
    int64_t taken = 0, left = n;
    for (int shift = 21; shift >= 10 && left > 2 * (w - taken) && w > taken; shift -= 11) {
        uint32_t hist[2048] = {0};
        for (int64_t i = 0; i < left; i++) hist[(order_key(buf[i]) >> shift) & 2047]++;
        int64_t need = w - taken, above = 0;
        int b = 2047;
        while (above + hist[b] < need) above += hist[b--];
        int64_t kept = 0;
        for (int64_t i = 0; i < left; i++) {
            uint32_t d = (order_key(buf[i]) >> shift) & 2047;
            if (d > (uint32_t)b) vals[taken++] = buf[i];
            else if (d == (uint32_t)b) buf[kept++] = buf[i];
        }
        left = kept;
    }
    int64_t need = w - taken;
    if (need > 0) {
        largest(buf, left, need);
        memcpy(vals + taken, buf + left - need, sizeof(float) * need);
    }
    qsort(vals, w, sizeof(float), desc);
}

/* The first index j of q[0..w) whose running sum reaches `target`, summed as numpy's
   `_locate` does (float32 sums of blocks, their running sum in double); w if none. */
static int64_t reach(const float *q, int64_t w, double target) {
    double before = 0.0;
    for (int64_t start = 0; start < w; start += BLOCK) {
        int64_t end = start + BLOCK < w ? start + BLOCK : w;
        float s = 0.0f;
        for (int64_t i = start; i < end; i++) s += q[i];
        if (before + s < target && end < w) {
            before += s;
            continue;
        }
        double running = before;
        for (int64_t i = start; i < end; i++) {
            running += q[i];
            if (!(running < target)) return i;
        }
        return w;
    }
    return w;
}

typedef struct {
    int64_t top_k;
    double top_p;
    float min_p;
} Filters;

/* The row's threshold from top-k and top-p over `vals`, its `w` largest logits sorted
   (largest first); `mass`: the total weight of the row, for top-p without top-k. Returns NAN
   when the nucleus reaches past the w candidates (the caller tries again with them all). */
static float head_threshold(const float *vals, int64_t w, Filters f, float scale, double mass,
                            float *q) {
    float tau = f.top_k > 0 ? vals[f.top_k - 1] : -INFINITY;
    if (f.top_p >= 1.0) return tau;
    for (int64_t i = 0; i < w; i += LANES) {
        vf v = load(vals, i, w);
        vf e = (vf)((vi)vexp((v - vals[0]) * scale) & (v >= tau));
        for (int64_t k = 0; k < LANES && i + k < w; k++) q[i + k] = e[k];
    }
    double total = mass;
    if (f.top_k > 0) {
        total = 0.0;
        for (int64_t start = 0; start < w; start += BLOCK) {
            float s = 0.0f;
            for (int64_t i = start; i < start + BLOCK && i < w; i++) s += q[i];
            total += s;
        }
    }
    int64_t j = reach(q, w, f.top_p * total);
    if (j < w) return vals[j] > tau ? vals[j] : tau;
    return NAN;
}

/* The weight of the ids with x >= v (q: each id's weight, 0 for banned ones), and how many
   ids have x >= v. */
static double mass_from(const float *x, const float *q, int64_t n, float v,
                                   int64_t *at_least) {
    double mass = 0.0; /* float sums of blocks, added in double, as numpy's search does */
    vi count = {0};
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        vf acc = {0};
        for (int64_t i = start; i < end; i += LANES) {
            vi ge = load(x, i, end) >= v;
            acc += (vf)((vi)load(q, i, end) & ge);
            count -= ge; /* -1 per lane where x >= v */
        }
        mass += hsum(acc);
    }
    int64_t c = 0;
    for (int k = 0; k < LANES; k++) c += count[k];
    *at_least = c;
    return mass;
}

/* Top-p's threshold when the nucleus is wider than the HEAD candidates (without top-k): the
   largest logit v whose ids with x >= v weigh `target`. Bisection on v over the weights (a
   vectorised pass a round) until at most HEAD ids are left between the bounds, then those
   are sorted and added up in order. `hi`: the last candidate's logit (the answer when its
   ties beyond the candidates reach `target`). */
static float wide_threshold(const float *x, int64_t n, const int64_t *banned, int64_t n_banned,
                            Weights wt, double target, float hi, float *q, float *buf) {
    for (int64_t b = 0; b * BLOCK < n; b++) {
        int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n;
        block_weights(x, start, end, wt.m, wt.scale, -INFINITY, banned, n_banned, q + start);
    }
    int64_t n_hi, n_lo, n_mid;
    double running = mass_from(x, q, n, hi, &n_hi);
    if (running >= target) return hi; /* ties past the candidates reach it */
    /* Below this every weight underflows to 0: the ids from it weigh the whole mass. */
    float lo = wt.m - 88.0f / wt.scale;
    mass_from(x, q, n, lo, &n_lo);
    for (int round = 0; round < 48 && n_lo - n_hi > HEAD; round++) {
        float mid = lo / 2 + hi / 2;
        if (!(mid > lo && mid < hi)) break;
        double m = mass_from(x, q, n, mid, &n_mid);
        if (m >= target) {
            lo = mid, n_lo = n_mid;
        } else {
            hi = mid, n_hi = n_mid, running = m;
        }
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++)
        if (x[i] >= lo && x[i] < hi && q[i] > 0.0f) buf[k++] = x[i];
    qsort(buf, k, sizeof(float), desc);
    for (int64_t i = 0; i < k; i++) {
        running += exp_one((buf[i] - wt.m) * wt.scale);
        if (running >= target) return buf[i];
    }
    return -INFINITY; /* only rounding stops short of top_p: keep the row */
}

/* The floor of a filtered row's weights: its top-k, top-p and min-p thresholds, the highest. */
static float filter_floor(const float *x, int64_t n, const int64_t *banned, int64_t n_banned,
                          Filters f, Weights wt, double mass, float *buf, float *vals, float *q) {
    float tau = f.min_p > 0.0f ? wt.m + logf(f.min_p) / wt.scale : -INFINITY;
    if (f.top_k <= 0 && f.top_p >= 1.0) return tau;
    int64_t w = f.top_k > n ? n : f.top_k;
    if (f.top_p < 1.0 && w < HEAD) w = HEAD < n ? HEAD : n;
    for (;;) {
        for (int64_t i = 0; i < n; i++) buf[i] = x[i] == x[i] ? x[i] : -INFINITY;
        for (int64_t j = 0; j < n_banned; j++) buf[banned[j]] = -INFINITY;
        top_values(buf, n, w, vals);
        Filters g = f;
        g.top_k = f.top_k > n ? n : f.top_k;
        float head = head_threshold(vals, w, g, wt.scale, mass, q);
        if (head != head && g.top_k <= 0 && w < n)
            head = wide_threshold(x, n, banned, n_banned, wt, f.top_p * mass, vals[w - 1], q, buf);
        if (w == n && head != head) /* every id a candidate: only rounding stops short */
            head = g.top_k > 0 ? vals[g.top_k - 1] : -INFINITY;
        if (head == head) return head > tau ? head : tau;
        w = n;
    }
}

typedef struct {
    float *sums, *buf, *vals, *q;
    double *cum;
} Scratch;

/* One row's token (-1: the allowed weights underflowed or no id is allowed). `m`: the row's
   maximum, whose exponentials' block sums `s->sums` holds. Plain rows draw from weights
   relative to `m` (as numpy's short path does); filtered rows from weights relative to the
   best allowed logit, above their filters' floor. */
static int64_t row_token(const float *x, int64_t n, float m, float temp, Filters f, double u,
                         const int64_t *banned, int64_t n_banned, Scratch *s) {
    if (!(temp > 0.0f)) return greedy(x, n, m, banned, n_banned);
    float scale = (float)(1.0 / (double)temp);
    Weights wt = {m, scale, -INFINITY};
    if (f.top_k <= 0 && f.top_p >= 1.0 && f.min_p <= 0.0f) {
        allowed_sums(x, n, wt, m, banned, n_banned, s->sums);
        return draw(x, n, wt, u, banned, n_banned, s->sums, s->cum);
    }
    int64_t best = greedy(x, n, m, banned, n_banned);
    if (best < 0) return -1;
    wt.m = x[best];
    double mass = allowed_sums(x, n, wt, m, banned, n_banned, s->sums);
    wt.floor = filter_floor(x, n, banned, n_banned, f, wt, mass, s->buf, s->vals, s->q);
    if (wt.floor != -INFINITY) allowed_sums(x, n, wt, NAN, banned, n_banned, s->sums);
    return draw(x, n, wt, u, banned, n_banned, s->sums, s->cum);
}

/* The counter-based stream (server/sampler.py, stream_uniforms): row r's uniform is a hash of
   its seed's two 32-bit halves and its position. The constants come from Python once
   (set_stream_hash), so they are defined in one place. */
static uint32_t hash_start, hash_mix[2], hash_shift[3];
static int hash_set = 0;

static uint32_t hash32(uint32_t h) {
    h ^= h >> hash_shift[0];
    h *= hash_mix[0];
    h ^= h >> hash_shift[1];
    h *= hash_mix[1];
    return h ^ (h >> hash_shift[2]);
}

static double uniform(int64_t seed, int64_t position) {
    uint64_t s = (uint64_t)seed, p = (uint64_t)position;
    uint32_t h = hash_start;
    h = hash32(h ^ (uint32_t)s);
    h = hash32(h ^ (uint32_t)(s >> 32));
    h = hash32(h ^ (uint32_t)p);
    h = hash32(h ^ hash_start);
    return (double)h * (1.0 / 4294967296.0);
}

static PyObject *set_stream_hash(PyObject *self, PyObject *args) {
    (void)self;
    unsigned int start, m0, m1, s0, s1, s2;
    if (!PyArg_ParseTuple(args, "IIIIII", &start, &m0, &m1, &s0, &s1, &s2)) return NULL;
    if (s0 > 31 || s1 > 31 || s2 > 31) {
        PyErr_SetString(PyExc_ValueError, "hash shifts must be in [0, 31]");
        return NULL;
    }
    hash_start = start, hash_mix[0] = m0, hash_mix[1] = m1;
    hash_shift[0] = s0, hash_shift[1] = s1, hash_shift[2] = s2;
    hash_set = 1;
    Py_RETURN_NONE;
}


typedef struct {
    Py_buffer buf;
    const char *name;
    int held;
} Arg;

static int get(PyObject *obj, Arg *arg, const char *name, const char *format, Py_ssize_t count,
               int writable) {
    arg->name = name;
    arg->held = 0;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &arg->buf, flags) < 0) return -1;
    arg->held = 1;
    const char *f = arg->buf.format ? arg->buf.format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    int ok_format = strcmp(f, format) == 0 || (format[0] == 'q' && strcmp(f, "l") == 0 &&
                                                sizeof(long) == 8);
    if (!ok_format || arg->buf.len != count * arg->buf.itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of format '%s', got %zd bytes of '%s'",
                     name, count, format, arg->buf.len, f);
        return -1;
    }
    return 0;
}

/* Release the buffers `get` took of the first `n` arguments (those it reached). */
static void release(Arg *a, int n) {
    for (int i = 0; i < n; i++)
        if (a[i].held) PyBuffer_Release(&a[i].buf);
}

/* The rows and the widths of [rows, N] arguments, from their shapes; -1 on a bad shape. */
static Py_ssize_t shape_of(PyObject *obj, Py_ssize_t rows, Py_ssize_t *width) {
    Py_buffer p;
    if (PyObject_GetBuffer(obj, &p, PyBUF_C_CONTIGUOUS | PyBUF_ND) < 0) return -2;
    Py_ssize_t got = p.ndim == 2 && (rows < 0 || p.shape[0] == rows) ? p.shape[0] : -1;
    *width = p.ndim == 2 ? p.shape[1] : -1;
    PyBuffer_Release(&p);
    return got;
}

/* One call's rows and where their results go (see `sample`). */
typedef struct {
    const float *logits, *temperature, *top_p, *min_p;
    const int64_t *top_k, *seed, *position, *banned, *top_counts;
    int64_t *tokens, *top_ids;
    float *logprobs, *lse, *top_lps;
    char *lost;
    int64_t rows, vocab, n_banned, k_max;
} Job;

/* What is wrong with a job's rows (NULL: nothing): reported ids must fit, and each row's
   banned ids must be ids of the vocabulary in increasing order, then -1s. */
static const char *check_job(const Job *job) {
    for (int64_t r = 0; r < job->rows; r++) {
        int64_t k = job->top_counts[r];
        if (k < 0 || k > job->k_max || k > job->vocab) return "top_counts out of range";
        const int64_t *ban = job->banned + r * job->n_banned;
        for (int64_t j = 0, prev = -1, ended = 0; j < job->n_banned; j++) {
            if (ban[j] == -1) ended = 1;
            else if (ended || ban[j] <= prev || ban[j] >= job->vocab)
                return "banned_ids must be increasing ids of the vocabulary, then -1s";
            else prev = ban[j];
        }
    }
    return NULL;
}

/* Row r of the job: its token (or `lost`), log-prob, log-sum-exp and alternatives. */
static void sample_row(const Job *job, int64_t r, Scratch *scratch) {
    int64_t vocab = job->vocab;
    const float *x = job->logits + r * vocab;
    const int64_t *ban = job->banned + r * job->n_banned;
    int64_t n_ban = 0;
    while (n_ban < job->n_banned && ban[n_ban] >= 0) n_ban++;
    float m = row_max(x, vocab);
    float row_lse = m + (float)log(block_sums(x, vocab, m, 1.0f, -INFINITY, scratch->sums));
    int64_t token = -1; /* a row with NaN or infinite logits: lost, left to the graph */
    if (isfinite(row_lse)) {
        Filters f = {job->top_k[r], (double)job->top_p[r], job->min_p[r]};
        double u = uniform(job->seed[r], job->position[r]);
        token = row_token(x, vocab, m, job->temperature[r], f, u, ban, n_ban, scratch);
    }
    job->lost[r] = token < 0;
    job->tokens[r] = token < 0 ? 0 : token;
    job->lse[r] = row_lse;
    job->logprobs[r] = token < 0 ? 0.0f : x[token] - row_lse;
    int64_t k = job->top_counts[r];
    if (k > 0) {
        float *lps = job->top_lps + r * job->k_max;
        top_k_float(x, vocab, k, job->top_ids + r * job->k_max, lps);
        for (int64_t j = 0; j < k; j++) lps[j] -= row_lse;
    }
}

enum { LOGITS, TEMPERATURE, TOP_K, TOP_P, MIN_P, SEED, POSITION, BANNED, TOP_COUNTS, TOKENS,
       LOGPROBS, LSE, TOP_IDS, TOP_LPS, LOST, N_ARGS };

/* The job of `sample`'s arguments, their buffers held in a[] (released by the caller);
   -1 with an exception set when one is not what it must be. */
static int job_of(PyObject *const *args, Arg *a, Job *job) {
    Py_ssize_t vocab = 0, n_banned = 0, k_max = 0;
    Py_ssize_t rows = shape_of(args[LOGITS], -1, &vocab);
    if (rows == -2) return -1;
    if (rows < 0 || vocab < 1 || (vocab + BLOCK - 1) / BLOCK > MAX_BLOCKS) {
        PyErr_SetString(PyExc_ValueError, "logits must be [rows, vocab] with 1 <= vocab <= 8M");
        return -1;
    }
    Py_ssize_t b1 = shape_of(args[BANNED], rows, &n_banned), b2 = shape_of(args[TOP_IDS], rows, &k_max);
    if (b1 == -2 || b2 == -2) return -1;
    if (b1 < 0 || b2 < 0) {
        PyErr_SetString(PyExc_ValueError, "banned_ids and top_ids must be [rows, N]");
        return -1;
    }
    static const char *names[N_ARGS] = {
        "logits",     "temperature", "top_k",      "top_p",      "min_p",
        "seed",       "position",    "banned_ids", "top_counts", "tokens",
        "logprobs",   "lse",         "top_ids",    "top_logprobs", "lost"};
    static const char *formats[N_ARGS] = {"f", "f", "q", "f", "f", "q", "q", "q",
                                          "q", "q", "f", "f", "q", "f", "?"};
    Py_ssize_t counts[N_ARGS] = {rows * vocab, rows, rows, rows, rows, rows, rows,
                                 rows * n_banned, rows, rows, rows, rows, rows * k_max,
                                 rows * k_max, rows};
    for (int i = 0; i < N_ARGS; i++)
        if (get(args[i], &a[i], names[i], formats[i], counts[i], i >= TOKENS) < 0) return -1;
    *job = (Job){a[LOGITS].buf.buf, a[TEMPERATURE].buf.buf, a[TOP_P].buf.buf, a[MIN_P].buf.buf,
                 a[TOP_K].buf.buf, a[SEED].buf.buf, a[POSITION].buf.buf, a[BANNED].buf.buf,
                 a[TOP_COUNTS].buf.buf, a[TOKENS].buf.buf, a[TOP_IDS].buf.buf,
                 a[LOGPROBS].buf.buf, a[LSE].buf.buf, a[TOP_LPS].buf.buf, a[LOST].buf.buf,
                 rows, vocab, n_banned, k_max};
    const char *wrong = check_job(job);
    if (wrong != NULL) {
        PyErr_SetString(PyExc_ValueError, wrong);
        return -1;
    }
    return 0;
}

static PyObject *sample(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != N_ARGS) {
        PyErr_SetString(PyExc_TypeError, "sample takes 15 arrays");
        return NULL;
    }
    if (!hash_set) {
        PyErr_SetString(PyExc_RuntimeError, "set_stream_hash was not called");
        return NULL;
    }
    Arg a[N_ARGS];
    memset(a, 0, sizeof a);
    PyObject *result = NULL;
    Job job;
    if (job_of(args, a, &job) < 0) goto done;
    int64_t blocks = (job.vocab + BLOCK - 1) / BLOCK;
    float *floats = PyMem_RawMalloc(sizeof(float) * (blocks + 3 * job.vocab));
    double *cum = PyMem_RawMalloc(sizeof(double) * blocks);
    if (!floats || !cum) {
        PyMem_RawFree(floats);
        PyMem_RawFree(cum);
        PyErr_NoMemory();
        goto done;
    }
    Scratch scratch = {floats, floats + blocks, floats + blocks + job.vocab,
                       floats + blocks + 2 * job.vocab, cum};
    Py_BEGIN_ALLOW_THREADS;
    for (int64_t r = 0; r < job.rows; r++) sample_row(&job, r, &scratch);
    Py_END_ALLOW_THREADS;
    PyMem_RawFree(floats);
    PyMem_RawFree(cum);
    result = Py_NewRef(Py_None);
done:
    release(a, N_ARGS);
    return result;
}

/* x - (max + log(sum(exp(x - max)))) over each row: out[r, i] for x[r, i] (the same shape). */
static void log_softmax_row(const float *x, int64_t n, float *out, float *sums) {
    float m = row_max(x, n);
    float c = m + (float)log(block_sums(x, n, m, 1.0f, -INFINITY, sums));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] - c;
}

/* log_softmax(x, out): x float32 [rows, V] (any leading shape, C order), out likewise. */
static PyObject *log_softmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "log_softmax takes x and out");
        return NULL;
    }
    Py_buffer probe;
    if (PyObject_GetBuffer(args[0], &probe, PyBUF_C_CONTIGUOUS | PyBUF_ND) < 0) return NULL;
    Py_ssize_t vocab = probe.ndim >= 1 ? probe.shape[probe.ndim - 1] : 0;
    Py_ssize_t total = probe.len / (probe.itemsize ? probe.itemsize : 1);
    PyBuffer_Release(&probe);
    if (vocab < 1 || (vocab + BLOCK - 1) / BLOCK > MAX_BLOCKS) {
        PyErr_SetString(PyExc_ValueError, "x's last axis must have 1 to 8M values");
        return NULL;
    }
    Arg a[2];
    memset(a, 0, sizeof a);
    PyObject *result = NULL;
    if (get(args[0], &a[0], "x", "f", total, 0) < 0 || get(args[1], &a[1], "out", "f", total, 1) < 0)
        goto done;
    float *sums = PyMem_RawMalloc(sizeof(float) * ((vocab + BLOCK - 1) / BLOCK));
    if (!sums) {
        PyErr_NoMemory();
        goto done;
    }
    const float *x = a[0].buf.buf;
    float *out = a[1].buf.buf;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < total / vocab; r++) log_softmax_row(x + r * vocab, vocab, out + r * vocab, sums);
    Py_END_ALLOW_THREADS;
    PyMem_RawFree(sums);
    result = Py_NewRef(Py_None);
done:
    release(a, 2);
    return result;
}

/* top_k(x, ids, vals) -> count: the largest of 1-D float32 or float64 `x` into int64 `ids`
   and `vals` (x's type), as many as they hold, largest first, ties by the lower id; NaNs are
   never chosen, so the count is below their size only when x holds too few other values. */
static PyObject *top_k(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "top_k takes x, ids and vals");
        return NULL;
    }
    Py_buffer probe;
    if (PyObject_GetBuffer(args[0], &probe, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    Py_ssize_t n = probe.len / (probe.itemsize ? probe.itemsize : 1);
    int wide = probe.itemsize == 8;
    PyBuffer_Release(&probe);
    Py_ssize_t k = PyObject_Length(args[1]);
    if (k < 0) return NULL;
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "ids must hold at least one id");
        return NULL;
    }
    const char *format = wide ? "d" : "f";
    Arg a[3];
    memset(a, 0, sizeof a);
    PyObject *result = NULL;
    if (get(args[0], &a[0], "x", format, n, 0) < 0 || get(args[1], &a[1], "ids", "q", k, 1) < 0 ||
        get(args[2], &a[2], "vals", format, k, 1) < 0)
        goto done;
    int64_t got;
    if (wide) got = top_k_double(a[0].buf.buf, n, k, a[1].buf.buf, a[2].buf.buf);
    else got = top_k_float(a[0].buf.buf, n, k, a[1].buf.buf, a[2].buf.buf);
    result = PyLong_FromLongLong(got);
done:
    release(a, 3);
    return result;
}

/* uniforms(seed, position, out): out[r] = row r's uniform (for the tests of the stream). */
static PyObject *uniforms(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !hash_set) {
        PyErr_SetString(PyExc_TypeError, "uniforms takes seed, position and out, after set_stream_hash");
        return NULL;
    }
    Arg a[3];
    memset(a, 0, sizeof a);
    PyObject *result = NULL;
    Py_ssize_t n = PyObject_Length(args[0]);
    if (n < 0) return NULL;
    static const char *names[3] = {"seed", "position", "out"}, *formats[3] = {"q", "q", "d"};
    for (int i = 0; i < 3; i++)
        if (get(args[i], &a[i], names[i], formats[i], n, i == 2) < 0) goto done;
    const int64_t *seed = a[0].buf.buf, *position = a[1].buf.buf;
    double *out = a[2].buf.buf;
    for (Py_ssize_t r = 0; r < n; r++) out[r] = uniform(seed[r], position[r]);
    result = Py_NewRef(Py_None);
done:
    release(a, 3);
    return result;
}

/* cpu_level() -> int: the highest x86-64 level this CPU runs (4: AVX-512, 3: AVX2, 1: the
   baseline), 0 elsewhere; server/fastsample.py asks the baseline build before it loads another. */
static PyObject *cpu_level(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    long level = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    /* The compiler's own definition of each level: what -march=x86-64-vN may emit. */
    __builtin_cpu_init();
    level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    level = 1;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2"))
        level = 3;
    if (level == 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        level = 4;
#endif
    return PyLong_FromLong(level);
}

static PyMethodDef methods[] = {
    {"sample", (PyCFunction)(void (*)(void))sample, METH_FASTCALL,
     "sample(logits, temperature, top_k, top_p, min_p, seed, position, banned_ids, top_counts, "
     "tokens, logprobs, lse, top_ids, top_logprobs, lost): sample rows into the outputs."},
    {"log_softmax", (PyCFunction)(void (*)(void))log_softmax, METH_FASTCALL,
     "log_softmax(x, out): each row's log-softmax over the last axis of float32 x, into out."},
    {"top_k", (PyCFunction)(void (*)(void))top_k, METH_FASTCALL,
     "top_k(x, ids, vals) -> count: the largest of 1-D float32/float64 x, largest first."},
    {"uniforms", (PyCFunction)(void (*)(void))uniforms, METH_FASTCALL,
     "uniforms(seed, position, out): each row's uniform of its counter-based stream."},
    {"cpu_level", cpu_level, METH_NOARGS,
     "cpu_level() -> int: the highest x86-64 level this CPU runs (4, 3 or 1; 0 elsewhere)."},
    {"set_stream_hash", set_stream_hash, METH_VARARGS,
     "set_stream_hash(start, mix0, mix1, shift0, shift1, shift2): the stream's hash constants."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, TEXT(MODULE_NAME), "The plain-row sampler (server/_fastsample.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC JOIN(PyInit_, MODULE_NAME)(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 ||
                      PyModule_AddIntConstant(m, "LANES", LANES) < 0 ||
                      PyModule_AddIntConstant(m, "LEVEL", LEVEL) < 0))
        Py_CLEAR(m);
    return m;
}
