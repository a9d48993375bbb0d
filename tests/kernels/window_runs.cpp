// The runs of queries whose windows hold a range of keys (na_window_run, kernels/common.cuh, in
// closed form) against their definition: a scan of every query's window (na_group_window), for
// every group length up to 24, kernel size, stride up to the kernel size, causal or not, and key
// range, and for random larger ones; in 32- and 64-bit indices. Built with kernels/host.h by
// test_cuda_host.py; prints the cases checked and exits nonzero on any difference.
#include "host.h"
#include "common.cuh"

#include <cstdio>
#include <random>

namespace {

// The run by its definition: every query whose window meets [first, last].
NaRange scanned_run(long long first, long long last, long long lg, int kernel, int stride,
                    bool causal) {
    long long start = -1, end = -1;
    for (long long qi = 0; qi < lg; ++qi) {
        const NaRange w = na_group_window(qi, lg, kernel, stride, causal);
        if (w.start <= last && first < w.end) {
            if (start < 0) {
                start = qi;
            } else if (end != qi) {
                return {-1, -1};  // not one run
            }
            end = qi + 1;
        }
    }
    return start < 0 ? NaRange{0, 0} : NaRange{start, end};
}

int differences(long long first, long long last, long long lg, int kernel, int stride,
                bool causal) {
    const NaRange want = scanned_run(first, last, lg, kernel, stride, causal);
    const NaRange wide = na_window_run(first, last, lg, kernel, stride, causal);
    const NaRange narrow =
        na_window_run((int)first, (int)last, (int)lg, kernel, stride, causal);
    const bool wrong = want.start != wide.start || want.end != wide.end ||
                       want.start != narrow.start || want.end != narrow.end;
    if (wrong) {
        std::printf("keys [%lld, %lld] of %lld, kernel %d, stride %d, causal %d: run [%lld, %lld), "
                    "not [%lld, %lld)\n",
                    first, last, lg, kernel, stride, (int)causal, wide.start, wide.end,
                    want.start, want.end);
    }
    return wrong;
}

}  // namespace

int main() {
    long long cases = 0;
    int wrong = 0;
    for (int lg = 1; lg <= 24; ++lg) {
        for (int kernel = 1; kernel <= lg; ++kernel) {
            for (int stride = 1; stride <= kernel; ++stride) {
                for (int causal = 0; causal < 2; ++causal) {
                    for (int first = 0; first < lg; ++first) {
                        for (int last = first; last < lg; ++last, ++cases) {
                            wrong += differences(first, last, lg, kernel, stride, causal != 0);
                        }
                    }
                }
            }
        }
    }
    std::mt19937 rng(7);
    auto below = [&](int n) { return (int)(rng() % (unsigned)n); };
    for (int i = 0; i < 20000; ++i, ++cases) {
        const int lg = 1 + below(600), kernel = 1 + below(lg), stride = 1 + below(kernel);
        const int first = below(lg), last = first + below(std::min(lg - first, 1 + below(70)));
        wrong += differences(first, last, lg, kernel, stride, below(2) != 0);
    }
    std::printf("%lld window runs, %d differences\n", cases, wrong);
    return wrong == 0 ? 0 : 1;
}
