// The `tt` table's routing on the CPU (tt.py, TTEmbeddingBag._native_rows): a batch's ids deduplicated and
// each distinct id sent to its raw row, its cache slot or the TT chain product (with its core rows) in one
// pass; then the rows copied to the batch's positions, and in the backward each position's gradient added
// to its distinct id's row. The same results as the PyTorch path in tt.py, bit for bit: distinct ids
// ascending (torch.unique), each kind's ids in that order (the PyTorch path's concatenation), gradients
// summed in position order (index_add_), no arithmetic but those adds. The chain product stays torch.bmm.
// Plain C ABI on raw buffers: built with g++ alone (no PyTorch headers) and called through ctypes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// First index i in [0, n) with a[i] > x (a sorted, n >= 1, a[0] <= x): upper_bound - 1 without branches.
inline int64_t last_not_above(const int64_t* a, int64_t n, int64_t x) {
    const int64_t* base = a;
    while (n > 1) {
        const int64_t half = n / 2;
        base = base[half] <= x ? base + half : base;
        n -= half;
    }
    return base - a;
}

// First index i in [0, n) with a[i] >= x, or n - 1 if none (searchsorted, clamped): without branches.
inline int64_t first_not_below(const int64_t* a, int64_t n, int64_t x) {
    const int64_t* base = a;
    while (n > 1) {
        const int64_t half = n / 2;
        base = base[half - 1] < x ? base + half : base;
        n -= half;
    }
    return base - a;
}

// LSD radix sort of keys ascending, 11 bits a pass; a pass whose digit every key shares is skipped.
void radix_sort(std::vector<uint64_t>& keys, std::vector<uint64_t>& tmp) {
    const int64_t n = (int64_t)keys.size();
    uint64_t any = 0, all = ~uint64_t(0);
    for (uint64_t k : keys) {
        any |= k;
        all &= k;
    }
    const uint64_t varying = any & ~all;
    tmp.resize(n);
    int64_t hist[2048];
    for (int shift = 0; shift < 64; shift += 11) {
        if (!((varying >> shift) & 2047)) continue;
        std::memset(hist, 0, sizeof(hist));
        for (int64_t j = 0; j < n; ++j) ++hist[(keys[j] >> shift) & 2047];
        int64_t sum = 0;
        for (int b = 0; b < 2048; ++b) {
            const int64_t c = hist[b];
            hist[b] = sum;
            sum += c;
        }
        for (int64_t j = 0; j < n; ++j) tmp[hist[(keys[j] >> shift) & 2047]++] = keys[j];
        keys.swap(tmp);
    }
}

inline uint64_t mix(uint64_t x) {
    x ^= x >> 31;
    x *= 0x9E3779B97F4A7C15ull;
    return x ^ (x >> 29);
}

template <typename T>
void scatter(int64_t n, int64_t dim, const int64_t* row_of, int64_t row_stride, const T* grad, int64_t grad_stride,
             T* out) {
    for (int64_t i = 0; i < n; ++i) {
        T* o = out + row_of[i * row_stride] * dim;
        const T* g = grad + i * grad_stride;
        for (int64_t j = 0; j < dim; ++j) o[j] += g[j];
    }
}

// The chain product of tt_cores._TTRows per id, as torch.bmm computes it for small matrices (its loop for
// products of fewer than 400 multiply-adds: each entry summed over the contraction index in order, from 0,
// no FMA), so the rows and gradients are those of the bmm path bit for bit. Core t is (P_t, r_in, q, r_out)
// row-major; shape holds (r_in, q, r_out) per core; partial[t - 1] receives the running product after core
// t, (n, Q_t, r_out) with Q_t = q_0 ... q_t (the last one is the rows, (n, D)).
// out (rows, cols) = (or += with Add) A B, A (rows, inner) and B (inner, cols) read through strides; each
// entry summed over the inner index in order from 0, then stored or added: bmm's small-matrix loop.
template <bool Add, typename F>
inline void product(int64_t rows, int64_t cols, int64_t inner, const F* A, int64_t a_row, int64_t a_inner,
                    const F* B, int64_t b_inner, int64_t b_col, F* out) {
    for (int64_t x = 0; x < rows; ++x)
        for (int64_t j = 0; j < cols; ++j) {
            F acc = 0;
            for (int64_t k = 0; k < inner; ++k) acc += A[x * a_row + k * a_inner] * B[k * b_inner + j * b_col];
            if (Add)
                out[x * cols + j] += acc;
            else
                out[x * cols + j] = acc;
        }
}

template <typename F>
void chain_forward(int64_t n, int64_t T, const int64_t* shape, const F* const* cores, const int64_t* core_rows,
                   F* const* partial) {
    for (int64_t i = 0; i < n; ++i) {
        const int64_t* rows = core_rows + i * T;
        const F* a = cores[0] + rows[0] * shape[1] * shape[2];  // (q_0, r_1)
        int64_t Q = shape[1];
        for (int64_t t = 1; t < T; ++t) {
            const int64_t r_in = shape[3 * t], cols = shape[3 * t + 1] * shape[3 * t + 2];
            const F* s = cores[t] + rows[t] * r_in * cols;  // (r_in, q r_out)
            F* o = partial[t - 1] + i * Q * cols;
            product<false>(Q, cols, r_in, a, r_in, 1, s, cols, 1, o);  // a s
            a = o;
            Q *= shape[3 * t + 1];
        }
    }
}

// The backward of chain_forward, as _TTRows.backward computes it with bmm and index_add_: per core t >= 1 the
// slice gradient a^T g and the running gradient g s^T (a: the running product before core t, (Q, r_in); g:
// the gradient after it, (Q, q r_out); s: the slice), each rounded to F; slice gradients added to their core
// rows in id order. dcores zeroed by the caller.
template <typename F>
void chain_backward(int64_t n, int64_t T, const int64_t* shape, const F* const* cores, const int64_t* core_rows,
                    const F* const* partial, const F* grad, F* const* dcores) {
    int64_t D = 1, widest = 1;
    for (int64_t t = 0; t < T; ++t) {
        D *= shape[3 * t + 1];
        widest = std::max(widest, shape[3 * t] * shape[3 * t + 1] * shape[3 * t + 2]);
    }
    std::vector<F> bufs(2 * D * widest);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t* rows = core_rows + i * T;
        const F* g = grad + i * D;
        F* spare = bufs.data();
        F* g_next = bufs.data() + D * widest;
        int64_t Q = D;
        for (int64_t t = T - 1; t >= 1; --t) {
            const int64_t r_in = shape[3 * t], cols = shape[3 * t + 1] * shape[3 * t + 2];
            Q /= shape[3 * t + 1];
            const F* a = t == 1 ? cores[0] + rows[0] * shape[1] * shape[2] : partial[t - 2] + i * Q * r_in;
            const F* s = cores[t] + rows[t] * r_in * cols;
            F* d = dcores[t] + rows[t] * r_in * cols;
            product<true>(r_in, cols, Q, a, 1, r_in, g, cols, 1, d);  // a^T g, added to the core row
            product<false>(Q, r_in, cols, g, cols, 1, s, 1, cols, spare);  // g s^T
            g = spare;
            std::swap(spare, g_next);
        }
        F* d = dcores[0] + rows[0] * shape[1] * shape[2];
        for (int64_t j = 0; j < shape[1] * shape[2]; ++j) d[j] += g[j];
    }
}

}  // namespace

extern "C" {

// torch.unique(ids, sorted=True, return_inverse=True, return_counts=True) for the batch's ids, by a hash
// table (first occurrences) and a sort of the distinct ids only. Returns the number of distinct ids u, or
// -1 - i where ids[i] is outside [0, num_ids).
int64_t tt_dedup(int64_t n, const int64_t* ids, int64_t num_ids, int64_t* unique, int64_t* inverse,
                 int64_t* counts) {
    static thread_local std::vector<int64_t> keys, first, first_count, rank;
    static thread_local std::vector<uint64_t> sorted, tmp;
    static thread_local std::vector<int32_t> slot_of;
    int64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    const uint64_t mask = (uint64_t)cap - 1;
    keys.resize(cap);
    slot_of.assign(cap, -1);
    first.clear();
    first_count.clear();
    for (int64_t i = 0; i < n; ++i) {
        const int64_t id = ids[i];
        if (id < 0 || id >= num_ids) return -1 - i;
        uint64_t h = mix((uint64_t)id) & mask;
        while (slot_of[h] >= 0 && keys[h] != id) h = (h + 1) & mask;
        if (slot_of[h] < 0) {
            keys[h] = id;
            slot_of[h] = (int32_t)first.size();
            first.push_back(id);
            first_count.push_back(0);
        }
        const int32_t k = slot_of[h];
        ++first_count[k];
        inverse[i] = k;  // first-occurrence index for now
    }
    const int64_t u = (int64_t)first.size();
    sorted.assign(first.begin(), first.end());
    radix_sort(sorted, tmp);
    // ranks of the first occurrences: look each sorted id up in the hash table
    rank.resize(u);
    for (int64_t r = 0; r < u; ++r) {
        const int64_t id = (int64_t)sorted[r];
        uint64_t h = mix((uint64_t)id) & mask;
        while (slot_of[h] < 0 || keys[h] != id) h = (h + 1) & mask;
        const int32_t k = slot_of[h];
        unique[r] = id;
        counts[r] = first_count[k];
        rank[k] = r;
    }
    for (int64_t i = 0; i < n; ++i) inverse[i] = rank[inverse[i]];
    return u;
}

// Route the u distinct ids (ascending) of a batch of n positions (inverse: position -> distinct id).
// A field's ids are raw rows (field_group < 0: row id - starts + field_base) or ids within a TT group
// (the same sum), split into mixed-radix digits (radix, most significant first) plus the group's core_base.
// A TT id is a cache hit by hit/slot when given (the table's own _cache_find), else by a search of the
// sorted cache_keys (EMPTY last) with cache_slots. Writes: the concatenation order raw ids, cache hits, TT
// rows (each ascending), as cat_of_pos (position -> row of the concatenation), cat_src (the raw row or
// cache slot of its first n_raw + n_cache rows), core_rows (n_tt, T) for the rest; tt_pos, the distinct
// ids that belong to a TT group (cached or not); sizes = {n_raw, n_cache, n_tt, n_tt_group}.
void tt_route(int64_t u, const int64_t* unique, int64_t n, const int64_t* inverse, int64_t nf, const int64_t* starts,
              const int64_t* field_group, const int64_t* field_base, int64_t t_cores, const int64_t* radix,
              const int64_t* core_base, int64_t cache_n, const int64_t* cache_keys, const int64_t* cache_slots,
              const uint8_t* hit, const int64_t* slot, int64_t* cat_of_pos, int64_t* cat_src, int64_t* core_rows,
              int64_t* tt_pos, int64_t* sizes) {
    static thread_local std::vector<int64_t> kind, src, group, where;
    kind.resize(u);
    src.resize(u);
    group.resize(u);
    where.resize(u);
    int64_t n_raw = 0, n_cache = 0, n_tt = 0, n_group = 0;
    for (int64_t j = 0; j < u; ++j) {
        const int64_t id = unique[j];
        const int64_t f = last_not_above(starts, nf, id);
        const int64_t g = field_group[f];
        const int64_t local = id - starts[f] + field_base[f];
        if (g < 0) {
            kind[j] = 0;
            src[j] = local;
            ++n_raw;
            continue;
        }
        tt_pos[n_group++] = j;
        bool found = false;
        int64_t s = 0;
        if (hit) {
            found = hit[j] != 0;
            s = slot[j];
        } else if (cache_n) {
            const int64_t p = first_not_below(cache_keys, cache_n, id);
            found = cache_keys[p] == id;
            s = cache_slots[p];
        }
        kind[j] = found ? 1 : 2;
        src[j] = found ? s : local;
        group[j] = g;
        n_cache += found;
        n_tt += !found;
    }
    int64_t next[3] = {0, n_raw, n_raw + n_cache};
    for (int64_t j = 0; j < u; ++j) {
        const int64_t k = next[kind[j]]++;
        where[j] = k;
        if (kind[j] < 2) {
            cat_src[k] = src[j];
            continue;
        }
        const int64_t g = group[j];
        int64_t rest = src[j];
        int64_t* out = core_rows + (k - n_raw - n_cache) * t_cores;
        for (int64_t t = t_cores - 1; t >= 0; --t) {
            const int64_t r = radix[g * t_cores + t];
            out[t] = rest % r + core_base[g * t_cores + t];
            rest /= r;
        }
    }
    for (int64_t i = 0; i < n; ++i) cat_of_pos[i] = where[inverse[i]];
    sizes[0] = n_raw;
    sizes[1] = n_cache;
    sizes[2] = n_tt;
    sizes[3] = n_group;
}

// out[i] = the row of concatenation row cat_of_pos[i]: raw[cat_src[k]] (k < n_raw), cache[cat_src[k]]
// (k < n_raw + n_cache), else tt[k - n_raw - n_cache]; rows of dim elements of elem_bytes each.
void tt_assemble(int64_t n, int64_t dim, int64_t elem_bytes, const int64_t* cat_of_pos, int64_t n_raw,
                 int64_t n_cache, const int64_t* cat_src, const char* raw, const char* cache, const char* tt,
                 char* out) {
    const int64_t row = dim * elem_bytes;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t k = cat_of_pos[i];
        const char* from = k < n_raw ? raw + cat_src[k] * row
                         : k < n_raw + n_cache ? cache + cat_src[k] * row
                         : tt + (k - n_raw - n_cache) * row;
        std::memcpy(out + i * row, from, row);
    }
}

// out[row_of[i]] += grad[i] for i in order (out zeroed by the caller): index_add_'s sums, rounded alike.
// Also the core gradients of the chain product (tt_cores._TTRows), row_of a column of its core rows.
void tt_scatter_f32(int64_t n, int64_t dim, const int64_t* row_of, int64_t row_stride, const float* grad,
                    int64_t grad_stride, float* out) {
    scatter(n, dim, row_of, row_stride, grad, grad_stride, out);
}

void tt_scatter_f64(int64_t n, int64_t dim, const int64_t* row_of, int64_t row_stride, const double* grad,
                    int64_t grad_stride, double* out) {
    scatter(n, dim, row_of, row_stride, grad, grad_stride, out);
}

// tt.TTEmbeddingBag.update_state's tracker merge, in place: the tracked ids (EMPTY: unused) with their counts
// times factor (rounded to float, as a float32 tensor times a Python float is), and the new (id, count)
// pairs, summed per distinct id (the new counts in order, then the old one, as index_add_ adds them); the
// capacity largest sums kept, largest first, ties to the smaller id (topk_ties_first over the distinct ids
// ascending). Returns the number kept.
int64_t tt_tracker_merge(int64_t capacity, int64_t* track_ids, float* track_counts, int64_t m, const int64_t* ids,
                         const float* counts, double factor, int64_t empty) {
    static thread_local std::vector<int64_t> all, uniq, inverse, dummy;
    static thread_local std::vector<uint64_t> order, spare;
    static thread_local std::vector<float> old, summed;
    const float f = (float)factor;
    all.clear();
    old.clear();
    int64_t top = 0;
    for (int64_t i = 0; i < capacity; ++i)
        if (track_ids[i] != empty) {
            all.push_back(track_ids[i]);
            old.push_back(track_counts[i] * f);
            top = std::max(top, track_ids[i]);
        }
    const int64_t n_old = (int64_t)all.size();
    all.insert(all.end(), ids, ids + m);
    for (int64_t i = 0; i < m; ++i) top = std::max(top, ids[i]);
    const int64_t n = (int64_t)all.size();
    uniq.resize(n);
    inverse.resize(n);
    dummy.resize(n);
    const int64_t u = tt_dedup(n, all.data(), top + 1, uniq.data(), inverse.data(), dummy.data());
    if (u < 0) return -1;  // a negative id
    summed.assign(u, 0.0f);
    for (int64_t i = 0; i < m; ++i) summed[inverse[n_old + i]] += counts[i];
    for (int64_t i = 0; i < n_old; ++i) summed[inverse[i]] += old[i];
    // topk_ties_first: a non-negative float's bits order like the float (+0.0 for -0.0), so the key
    // (bits, 2^32 - 1 - j) sorts the best last
    const int64_t keep = std::min(u, capacity);
    order.resize(u);
    for (int64_t j = 0; j < u; ++j) {
        uint32_t bits;
        const float v = summed[j] + 0.0f;
        std::memcpy(&bits, &v, 4);
        order[j] = ((uint64_t)bits << 32) | (0xFFFFFFFFu - (uint64_t)j);
    }
    radix_sort(order, spare);
    for (int64_t r = 0; r < keep; ++r) {
        const int64_t j = 0xFFFFFFFFu - (order[u - 1 - r] & 0xFFFFFFFFu);
        track_ids[r] = uniq[j];
        track_counts[r] = summed[j];
    }
    for (int64_t j = keep; j < capacity; ++j) {
        track_ids[j] = empty;
        track_counts[j] = 0.0f;
    }
    return keep;
}

void tt_chain_forward(int64_t elem_bytes, int64_t n, int64_t T, const int64_t* shape, const void* const* cores,
                      const int64_t* core_rows, void* const* partial) {
    if (elem_bytes == 4)
        chain_forward(n, T, shape, (const float* const*)cores, core_rows, (float* const*)partial);
    else
        chain_forward(n, T, shape, (const double* const*)cores, core_rows, (double* const*)partial);
}

void tt_chain_backward(int64_t elem_bytes, int64_t n, int64_t T, const int64_t* shape, const void* const* cores,
                       const int64_t* core_rows, const void* const* partial, const void* grad, void* const* dcores) {
    if (elem_bytes == 4)
        chain_backward(n, T, shape, (const float* const*)cores, core_rows, (const float* const*)partial,
                       (const float*)grad, (float* const*)dcores);
    else
        chain_backward(n, T, shape, (const double* const*)cores, core_rows, (const double* const*)partial,
                       (const double*)grad, (double* const*)dcores);
}

}  // extern "C"
