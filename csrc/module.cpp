// vlm2vec_rt._C: the native core. Only what must be native lives here (image tiling).
#include <pybind11/pybind11.h>

#include <thread>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "vlm2vec-rt native core: image tiling for anyres / Qwen2-VL inputs";
    m.def(
        "hardware_threads",
        []() {
            unsigned n = std::thread::hardware_concurrency();
            return n == 0 ? 1u : n;
        },
        "Number of hardware threads the tiling pool may use (num_threads=0).");
}
