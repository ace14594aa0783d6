// cafe's step bookkeeping on the CPU in one pass (cafe.py, CafeEmbeddingBag._scored_lookups): the gradient
// norms of a forward's lookups normalised per field to mean 1 (a field whose norms sum to 0, or a NaN,
// scores 1), and the lookups of hashed fields picked out with their ids and sketch codes, in lookup order.
// The same float32 operations in the same order as the PyTorch path (index_add_ sums in lookup order,
// count / total, norm * factor), so the scores are bit for bit equal. Plain C ABI, built by native.py.
#include <cstdint>
#include <vector>

extern "C" int64_t cafe_scored_lookups(int64_t n, int64_t fields, const float* norms, const int64_t* field,
                                       const uint8_t* hashed, const int64_t* ids, const int64_t* code,
                                       int64_t* out_ids, float* out_scores, int64_t* out_code) {
    std::vector<float> total(fields, 0.0f);
    std::vector<int64_t> count(fields, 0);
    for (int64_t i = 0; i < n; ++i) {
        total[field[i]] += norms[i];
        ++count[field[i]];
    }
    std::vector<float> factor(fields);
    for (int64_t f = 0; f < fields; ++f) factor[f] = (float)count[f] / total[f];
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t f = field[i];
        if (!hashed[f]) continue;
        float s = norms[i] * factor[f];
        if (s != s) s = 1.0f;  // 0 * inf (a field without gradient) or a NaN norm
        out_ids[k] = ids[i];
        out_scores[k] = s;
        out_code[k] = code[i];
        ++k;
    }
    return k;
}
