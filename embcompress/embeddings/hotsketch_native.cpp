// HotSketch locate (with the query's answer) and insert (with its maintenance) for the CPU, one pass
// per batch each; mpcache's count-min sketch update and estimate.
//
// The same batch rule, float sums and tie-breaks as the vectorised PyTorch path in hotsketch.py, which
// stays the reference (tests/embeddings/test_hotsketch.py compares the two states after every batch).
// Plain C ABI on raw buffers: built with g++ alone (no PyTorch headers, no ninja) and called through
// ctypes by native.py, which registers the calls as torch.library ops.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

const uint64_t MIX1 = 0x9E3779B97F4A7C15ULL;
const uint64_t MIX2 = 0xBF58476D1CE4E5B9ULL;
const float INF = std::numeric_limits<float>::infinity();
const int64_t AHEAD = 64;  // ids (or buckets) between a prefetch and its use

// hotsketch.bucket_of: int64 products wrap, shifts are arithmetic, as torch's int64 ops.
inline int64_t bucket_of(int64_t id, int64_t w, int64_t seed_add) {
    int64_t z = (int64_t)((uint64_t)id + (uint64_t)seed_add);
    z = (int64_t)((uint64_t)z * MIX1);
    z ^= z >> 29;
    z = (int64_t)((uint64_t)z * MIX2);
    z >>= 33;
    z += (int64_t)1 << 30;
    return (z * w) >> 31;
}

// One slot of HotSketch.table (int32 words: the id in one or two, the score's bits, the hot row), so
// the c slots of a bucket are one stretch of memory: one cache line with int64 ids and c = 4.
template <typename K>
struct Slot {
    K key;
    float score;
    int32_t hot;
};
static_assert(sizeof(Slot<int64_t>) == 16 && sizeof(Slot<int32_t>) == 12, "slots are 4 or 3 int32 words");

template <typename K>
inline void prefetch_bucket(const Slot<K>* b, int64_t c) {
    __builtin_prefetch(b);
    __builtin_prefetch((const char*)(b + c) - 1);  // a bucket may straddle two lines
}

// Slot (< c) of bucket b that holds id, or -1. Branch-free for c = 4 (which slot holds a found id is
// random, so an early exit mispredicts about once per id).
template <typename K>
inline int64_t find(const Slot<K>* b, int64_t c, int64_t id) {
    if (c == 4) {
        const unsigned m = (unsigned)((int64_t)b[0].key == id) | (unsigned)((int64_t)b[1].key == id) << 1 |
                           (unsigned)((int64_t)b[2].key == id) << 2 | (unsigned)((int64_t)b[3].key == id) << 3;
        return m ? __builtin_ctz(m) : -1;
    }
    for (int64_t j = 0; j < c; ++j)
        if ((int64_t)b[j].key == id) return j;
    return -1;
}

struct Params {
    int64_t w, c, rows, seed_add;
    double threshold_d;  // as given; scores compare with it in float32, as torch compares a float32 tensor
    float threshold, decay;
    double decay_mass;
    int pressure_decay, preempt;
    float margin;  // a swap needs waiting score * margin > hot score
};

template <typename K>
struct Sketch {
    Slot<K>* t;  // w * c slots, bucket-major
    uint8_t* used;
    double* mass;
    const Params& p;
};

// code[i]: the flat slot holding ids[i], or -1 - its bucket when the sketch does not hold it. With rows
// and scores: the query's answer (hot row or -1, score or 0).
template <typename K>
void locate(const Sketch<K>& s, int64_t n, const int64_t* ids, int64_t* code, int64_t* rows, float* scores) {
    const int64_t c = s.p.c;
    for (int64_t i = 0; i < n; ++i) code[i] = bucket_of(ids[i], s.p.w, s.p.seed_add);
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) prefetch_bucket(s.t + code[i + AHEAD] * c, c);
        const int64_t b = code[i];
        const int64_t j = find(s.t + b * c, c, ids[i]);
        const Slot<K>& x = s.t[b * c + (j < 0 ? 0 : j)];
        code[i] = j >= 0 ? b * c + j : -1 - b;
        if (rows) {
            rows[i] = j >= 0 ? x.hot : -1;
            scores[i] = j >= 0 ? x.score : 0.0f;
        }
    }
}

// Output lists of what the hot set did (int64 ids and rows).
struct Changes {
    int64_t *prom_ids, *prom_rows, *dem_ids, *dem_rows;
    int64_t n_prom = 0, n_dem = 0;
};

// Waiting entries (non-hot, score >= T) left after the previous call: given when nothing else changed
// the sketch since, so that only they and the slots this batch raised to T need looking at (no scan).
struct Waiting {
    const int64_t* before = nullptr;  // distinct, in no order
    int64_t n_before = -1;  // -1: unknown, scan
    int64_t used = -1;  // rows in use (-1: unknown, count them)
    std::vector<int64_t> touched;  // slots this batch brought to score >= T, non-hot, that are not in before
    int64_t* after = nullptr;  // out: the waiting entries left, distinct, in no order
    int64_t n_after = 0;
};

template <typename K>
void maintain(Sketch<K>& s, Changes& out, Waiting& waiting) {
    const Params& p = s.p;
    Slot<K>* t = s.t;
    const int64_t total = p.w * p.c;
    std::vector<int64_t> wait, hot;  // waiting and hot slots
    bool hot_listed = false;
    auto scan = [&]() {
        wait.clear();
        hot.clear();
        hot.reserve(p.rows);
        for (int64_t f = 0; f < total; ++f) {
            if (t[f].hot >= 0) hot.push_back(f);
            else if (t[f].score >= p.threshold) wait.push_back(f);
        }
        hot_listed = true;
    };
    auto list_hot = [&]() {
        hot.clear();
        for (int64_t f = 0; f < total; ++f)
            if (t[f].hot >= 0) hot.push_back(f);
        hot_listed = true;
    };
    int64_t used = 0;
    if (waiting.n_before >= 0) {
        auto consider = [&](int64_t f) {
            if (t[f].hot < 0 && t[f].score >= p.threshold) wait.push_back(f);
        };
        for (int64_t i = 0; i < waiting.n_before; ++i) consider(waiting.before[i]);
        for (int64_t f : waiting.touched) consider(f);  // distinct from before: no sort, no dedup
        used = waiting.used;
        if (used < 0)
            for (int64_t r = 0; r < p.rows; ++r) used += s.used[r] != 0;
    } else {
        scan();
        used = (int64_t)hot.size();  // every used row belongs to one hot slot
    }
    bool decay = *s.mass > p.decay_mass * (double)p.w * p.threshold_d;
    if (!decay && p.pressure_decay && p.decay < 1) decay = (int64_t)wait.size() > p.rows - used;
    if (decay) {
        if (!hot_listed) list_hot();
        for (int64_t f = 0; f < total; ++f) t[f].score *= p.decay;
        *s.mass = 0;
        for (int64_t f : hot) {
            if (t[f].score < p.threshold) {
                out.dem_ids[out.n_dem] = (int64_t)t[f].key;
                out.dem_rows[out.n_dem++] = t[f].hot;
                s.used[t[f].hot] = 0;
                t[f].hot = -1;
            }
        }
        scan();
        used = (int64_t)hot.size();
    }
    std::vector<int64_t> left;  // waiting entries after promotion and preemption
    if (!wait.empty()) {
        // Waiting entries are taken highest score first, ties by slot position, and preemption pairs them
        // with the hot entries lowest (score, slot) first. Both are heaps popped only as far as entries are
        // taken: with a low T most entries wait and most batches move none, so sorting them all would cost
        // more than the rest of the insert.
        auto behind = [&](int64_t a, int64_t b) {  // a is taken after b
            return t[a].score < t[b].score || (t[a].score == t[b].score && a > b);
        };
        std::make_heap(wait.begin(), wait.end(), behind);
        size_t queued = wait.size();  // wait[0, queued) is the heap
        auto take = [&]() {
            std::pop_heap(wait.begin(), wait.begin() + queued, behind);
            return wait[--queued];
        };
        for (int64_t r = 0; r < p.rows && queued > 0 && used < p.rows; ++r) {  // free rows, smallest first
            const void* free = std::memchr(s.used + r, 0, (size_t)(p.rows - r));
            if (!free) break;
            r = (const uint8_t*)free - s.used;
            const int64_t f = take();
            t[f].hot = (int32_t)r;
            s.used[r] = 1;
            ++used;
            if (hot_listed) hot.push_back(f);  // preemption ranks hot entries by (score, slot): order is free
            out.prom_ids[out.n_prom] = (int64_t)t[f].key;
            out.prom_rows[out.n_prom++] = r;
        }
        if (p.preempt && queued > 0) {
            // the i-th highest waiting entry against the i-th lowest-scored hot entry
            if (!hot_listed) list_hot();
            auto above = [&](int64_t a, int64_t b) {  // hot entry a is given up after b
                const float x = t[a].score + 0.0f, y = t[b].score + 0.0f;
                return y < x || (x == y && b < a);
            };
            std::make_heap(hot.begin(), hot.end(), above);
            size_t held = hot.size();
            while (queued > 0 && held > 0) {
                const int64_t win = wait[0], lose = hot[0];
                if (!(t[win].score * p.margin > t[lose].score)) break;  // the swaps are a prefix
                take();
                std::pop_heap(hot.begin(), hot.begin() + held--, above);
                const int32_t row = t[lose].hot;
                t[lose].hot = -1;
                t[win].hot = row;
                out.prom_ids[out.n_prom] = (int64_t)t[win].key;
                out.prom_rows[out.n_prom++] = row;
                out.dem_ids[out.n_dem] = (int64_t)t[lose].key;
                out.dem_rows[out.n_dem++] = row;
                if (t[lose].score >= p.threshold) left.push_back(lose);
            }
        }
        left.insert(left.end(), wait.begin(), wait.begin() + queued);
    }
    if (waiting.after) {
        std::copy(left.begin(), left.end(), waiting.after);
        waiting.n_after = (int64_t)left.size();
    }
}

// The order in which a bucket's slots take newcomers (step 3 of the batch rule): evictable slots by key
// (empty: -inf, else the score) ascending, ties by slot index, then the others (key +inf). Counts each
// slot's position instead of sorting: data-dependent branches of a 4-element sort mispredicted several
// times per bucket. C: c at compile time (0: use c).
template <typename K, int C>
inline void rank_slots(const Slot<K>* bk, int64_t c, float* key, int64_t* order) {
    const int64_t cc = C ? C : c;
    float min_hot = INF;
    for (int64_t j = 0; j < cc; ++j) min_hot = std::min(min_hot, bk[j].hot >= 0 ? bk[j].score : INF);
    for (int64_t j = 0; j < cc; ++j) {
        const bool empty = bk[j].key < 0;
        const bool evictable = empty || (bk[j].hot < 0 && bk[j].score <= min_hot);
        key[j] = evictable ? (empty ? -INF : bk[j].score) : INF;
    }
    for (int64_t j = 0; j < cc; ++j) {
        int64_t pos = 0;
        for (int64_t k = 0; k < cc; ++k) pos += k < j ? key[k] <= key[j] : key[k] < key[j];
        order[pos] = j;
    }
}

struct Newcomer {
    int64_t bucket, id;
    float score;
};

// An occurrence of an id the sketch does not hold.
struct Occurrence {
    int64_t id;
    float score;
    uint32_t bucket;
};

template <typename K>
void insert(Sketch<K>& s, int64_t n, const int64_t* ids, const float* add, double mass_add,
            const int64_t* given_code, Changes& out, Waiting& waiting) {
    const Params& p = s.p;
    Slot<K>* t = s.t;
    const int64_t c = p.c;
    const bool track = waiting.n_before >= 0;
    if (n > 0) {
        std::vector<int64_t> own;
        const int64_t* code = given_code;
        if (!code) {
            own.resize(n);
            locate(s, n, ids, own.data(), nullptr, nullptr);
            code = own.data();
        }
        // 1. scores of ids already in the sketch, in batch order; the newcomers listed (id, score,
        // bucket). Without branches on found / not found (one id in six is new, at random): a newcomer
        // adds to a scratch slot that is never a candidate.
        std::vector<Occurrence> fresh(n), spare;
        size_t m = 0;
        Slot<K> scratch{};
        scratch.hot = 0;
        for (int64_t i = 0; i < n; ++i) {
            // the score and hot row end a slot: their line (a 12-byte slot may straddle two)
            if (i + AHEAD < n && code[i + AHEAD] >= 0) __builtin_prefetch(&t[code[i + AHEAD]].hot);
            const int64_t f = code[i];
            const float a = add ? add[i] : 1.0f;
            fresh[m] = {ids[i], a, (uint32_t)(-1 - f)};
            m += f < 0;
            const uintptr_t keep = (uintptr_t)0 - (uintptr_t)(f >= 0);  // a select, not a branch
            Slot<K>* x = (Slot<K>*)(((uintptr_t)(t + f) & keep) | ((uintptr_t)&scratch & ~keep));
            const float was = x->score;
            x->score += a;
            // a non-hot slot at >= T before this batch is in waiting.before: list only those crossing T
            if (track && x->hot < 0 && x->score >= p.threshold && !(was >= p.threshold)) waiting.touched.push_back(f);
        }
        // 2. newcomers grouped by bucket, in batch order within a bucket (stable LSD radix passes over the
        // bucket's bytes), so that each bucket's newcomers and then its slots are read in sequence
        fresh.resize(m);
        spare.resize(m);
        for (int64_t shift = 0; (p.w - 1) >> shift; shift += 8) {
            size_t count[257] = {0};
            for (const Occurrence& o : fresh) ++count[((o.bucket >> shift) & 255) + 1];
            for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
            for (const Occurrence& o : fresh) spare[count[(o.bucket >> shift) & 255]++] = o;
            fresh.swap(spare);
        }
        // 3. per bucket: its newcomers aggregated per id (scores summed in batch order), ranked by score
        // (desc; ties: smaller id), against the evictable slots
        std::vector<Newcomer> group;  // one bucket's distinct newcomers
        std::vector<float> key(c);
        std::vector<int64_t> slot_order(c);
        for (int64_t j = 0; j < c; ++j) slot_order[j] = j;
        auto before = [](const Newcomer& a, const Newcomer& b) {
            const float x = std::max(a.score, 0.0f), y = std::max(b.score, 0.0f);
            return x > y || (x == y && a.id < b.id);
        };
        for (size_t lo = 0, hi; lo < m; lo = hi) {
            if (lo + AHEAD < m) prefetch_bucket(t + (int64_t)fresh[lo + AHEAD].bucket * c, c);
            const uint32_t b = fresh[lo].bucket;
            for (hi = lo + 1; hi < m && fresh[hi].bucket == b; ++hi) {}
            group.clear();
            if (hi - lo <= 64) {  // few occurrences (the usual): a linear search for each one's id
                for (size_t q = lo; q < hi; ++q) {
                    size_t e = 0;
                    while (e < group.size() && group[e].id != fresh[q].id) ++e;
                    if (e == group.size()) group.push_back({(int64_t)b, fresh[q].id, 0.0f});
                    group[e].score += fresh[q].score;
                }
            } else {  // many (newcomers outnumber the buckets): by id, batch order kept within an id
                std::stable_sort(fresh.begin() + lo, fresh.begin() + hi,
                                 [](const Occurrence& x, const Occurrence& y) { return x.id < y.id; });
                for (size_t q = lo; q < hi; ++q) {
                    if (group.empty() || group.back().id != fresh[q].id) group.push_back({(int64_t)b, fresh[q].id, 0.0f});
                    group.back().score += fresh[q].score;
                }
            }
            const size_t placed = std::min(group.size(), (size_t)c);  // at most c newcomers can be placed
            if (group.size() > 1) std::partial_sort(group.begin(), group.begin() + placed, group.end(), before);
            Slot<K>* bk = t + (int64_t)b * c;
            if (c == 4) rank_slots<K, 4>(bk, c, key.data(), slot_order.data());
            else rank_slots<K, 0>(bk, c, key.data(), slot_order.data());
            for (size_t r = 0; r < placed; ++r) {
                const Newcomer& nc = group[r];
                const int64_t j = slot_order[r];
                const float slot_score = key[j];
                if (!(slot_score < INF) || !(r == 0 || nc.score > slot_score)) continue;
                bk[j].key = (K)nc.id;
                bk[j].score = std::max(slot_score, 0.0f) + nc.score;
                // a slot whose evicted entry was waiting is listed already (each slot takes one newcomer)
                if (track && bk[j].hot < 0 && bk[j].score >= p.threshold && !(slot_score >= p.threshold))
                    waiting.touched.push_back((int64_t)b * c + j);
            }
        }
        *s.mass += mass_add;
    }
    maintain(s, out, waiting);
}

}  // namespace

extern "C" {

// HotSketch.table holds w * c slots of key_bytes (8: int64 ids, 4: int32) + 8 bytes. code: from
// hotsketch_locate on this state, or null. wait_before (n_wait_before of them): the waiting entries
// the previous call returned if nothing else changed the sketch since; else n_wait_before = -1 (every
// slot is scanned). rows_used: the rows in use, or -1 (counted). out (room for 8 * rows + 4 + w * c):
// the promoted ids, their rows, the demoted ids, their rows and the waiting entries left, one after the
// other; counts out: how many [promoted, demoted, waiting], or [-1, smallest id, largest id] for int32
// ids out of range (nothing changed).
void hotsketch_insert(int key_bytes, void* table, uint8_t* used, double* mass, int64_t w, int64_t c, int64_t rows,
                      int64_t seed_add, double threshold, double decay, double decay_mass, int pressure_decay,
                      int preempt, double preempt_margin, int64_t n, const int64_t* ids, const float* add,
                      double mass_add,
                      const int64_t* code, const int64_t* wait_before, int64_t n_wait_before, int64_t rows_used,
                      int64_t* out, int64_t* counts) {
    const int64_t room = 2 * rows + 1;  // promotions (and demotions) per call: rows + preemptions
    int64_t *prom_ids = out, *prom_rows = out + room, *dem_ids = out + 2 * room, *dem_rows = out + 3 * room;
    int64_t* wait_after = out + 4 * room;
    if (key_bytes == 4 && n > 0) {  // int32 ids hold [0, 2^31): refuse the batch before any change
        int64_t lo = ids[0], hi = ids[0];
        for (int64_t i = 1; i < n; ++i) {
            lo = std::min(lo, ids[i]);
            hi = std::max(hi, ids[i]);
        }
        if (lo < 0 || hi > std::numeric_limits<int32_t>::max()) {
            counts[0] = -1;
            counts[1] = lo;
            counts[2] = hi;
            return;
        }
    }
    Params p{w, c, rows, seed_add, threshold, (float)threshold, (float)decay, decay_mass, pressure_decay, preempt,
             (float)preempt_margin};
    Changes changes{prom_ids, prom_rows, dem_ids, dem_rows};
    Waiting waiting;
    waiting.before = wait_before;
    waiting.n_before = n_wait_before;
    waiting.used = rows_used;
    waiting.after = wait_after;
    if (key_bytes == 8) {
        Sketch<int64_t> s{(Slot<int64_t>*)table, used, mass, p};
        insert(s, n, ids, add, mass_add, code, changes, waiting);
    } else {
        Sketch<int32_t> s{(Slot<int32_t>*)table, used, mass, p};
        insert(s, n, ids, add, mass_add, code, changes, waiting);
    }
    // one after the other (each destination starts at or before its source)
    const int64_t p_ = changes.n_prom, d_ = changes.n_dem, k_ = waiting.n_after;
    std::memmove(out + p_, prom_rows, p_ * sizeof(int64_t));
    std::memmove(out + 2 * p_, dem_ids, d_ * sizeof(int64_t));
    std::memmove(out + 2 * p_ + d_, dem_rows, d_ * sizeof(int64_t));
    std::memmove(out + 2 * p_ + 2 * d_, wait_after, k_ * sizeof(int64_t));
    counts[0] = p_;
    counts[1] = d_;
    counts[2] = k_;
}

// HotSketch.locate and .query in one pass: code (slot, or -1 - bucket), and where rows is not null the
// hot row (-1 if not hot) and score (0 if absent) of each id.
void hotsketch_locate(int key_bytes, void* table, int64_t w, int64_t c, int64_t seed_add, int64_t n,
                      const int64_t* ids, int64_t* code, int64_t* rows, float* scores) {
    Params p{w, c, 0, seed_add, 0, 0, 0, 0, 0, 0, 0};
    if (key_bytes == 8) {
        Sketch<int64_t> s{(Slot<int64_t>*)table, nullptr, nullptr, p};
        locate(s, n, ids, code, rows, scores);
    } else {
        Sketch<int32_t> s{(Slot<int32_t>*)table, nullptr, nullptr, p};
        locate(s, n, ids, code, rows, scores);
    }
}

}  // extern "C"

namespace {

// mpcache's count-min sketch (depth rows of width int32 counters): rows 2j and 2j+1 take the low 31 and
// the high 32 bits of ops.hash64(id, seed=j) modulo width.
inline int64_t hash64(int64_t x, int64_t seed) {
    uint64_t z = (uint64_t)x + (uint64_t)(seed + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (int64_t)(z & 0x7FFFFFFFFFFFFFFFULL);
}

inline int64_t cms_column(int64_t h, int64_t r, int64_t width) {
    return ((r % 2 == 0) ? (h & 0x7FFFFFFF) : (h >> 31)) % width;
}

// Columns of ids[lo, hi) in each row, row-major in cols ((hi - lo) per row).
void cms_columns(int64_t depth, int64_t width, int64_t lo, int64_t hi, const int64_t* ids, int64_t* cols) {
    const int64_t m = hi - lo;
    for (int64_t i = lo; i < hi; ++i) {
        int64_t h = 0;
        for (int64_t r = 0; r < depth; ++r) {
            if (r % 2 == 0) h = hash64(ids[i], r / 2);
            cols[r * m + (i - lo)] = r * width + cms_column(h, r, width);
        }
    }
}

// Calls visit(counter, i) for each id i and row, walking the ids in blocks: the columns of a block first,
// then its counters, each fetched ahead.
template <typename Visit>
void cms_walk(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, Visit visit) {
    const int64_t block = 4096, ahead = 16;
    std::vector<int64_t> cols(depth * block);
    for (int64_t lo = 0; lo < n; lo += block) {
        const int64_t hi = std::min(n, lo + block), m = hi - lo;
        cms_columns(depth, width, lo, hi, ids, cols.data());
        for (int64_t r = 0; r < depth; ++r) {
            const int64_t* c = cols.data() + r * m;
            for (int64_t i = 0; i < m; ++i) {
                if (i + ahead < m) __builtin_prefetch(sketch + c[i + ahead]);
                visit(sketch[c[i]], r, lo + i);
            }
        }
    }
}

}  // namespace

extern "C" {

void cms_add(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, const int64_t* counts) {
    cms_walk(sketch, depth, width, n, ids, [&](int32_t& v, int64_t, int64_t i) { v += (int32_t)counts[i]; });
}

void cms_estimate(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, int64_t* out) {
    cms_walk(sketch, depth, width, n, ids, [&](int32_t& v, int64_t r, int64_t i) {
        out[i] = r == 0 ? (int64_t)v : std::min(out[i], (int64_t)v);
    });
}

}  // extern "C"
