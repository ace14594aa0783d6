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

}  // namespace

extern "C" {

// torch.unique(ids, sorted=True, return_inverse=True, return_counts=True) for the batch's ids, by a hash
// table (first occurrences) and a sort of the distinct ids only. Returns the number of distinct ids u, or
// -1 - i where ids[i] is outside [0, num_ids).
int64_t tt_dedup(int64_t n, const int64_t* ids, int64_t num_ids, int64_t* unique, int64_t* inverse,
                 int64_t* counts) {
    static thread_local std::vector<int64_t> keys, first, first_count, rank, sorted, tmp;
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
    // LSD radix sort of the distinct ids, 11 bits a pass, as many passes as num_ids has bits
    sorted.assign(first.begin(), first.end());
    tmp.resize(u);
    int bits = 0;
    while (bits < 63 && (int64_t(1) << bits) < num_ids) ++bits;
    int64_t hist[2048];
    for (int shift = 0; shift < bits; shift += 11) {
        std::memset(hist, 0, sizeof(hist));
        for (int64_t j = 0; j < u; ++j) ++hist[(sorted[j] >> shift) & 2047];
        int64_t sum = 0;
        for (int b = 0; b < 2048; ++b) {
            const int64_t c = hist[b];
            hist[b] = sum;
            sum += c;
        }
        for (int64_t j = 0; j < u; ++j) tmp[hist[(sorted[j] >> shift) & 2047]++] = sorted[j];
        sorted.swap(tmp);
    }
    // ranks of the first occurrences: look each sorted id up in the hash table
    rank.resize(u);
    for (int64_t r = 0; r < u; ++r) {
        const int64_t id = sorted[r];
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

}  // extern "C"
