// The one pybind11 module: each kernel family registers its functions here.
#include <pybind11/pybind11.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "llama-engine CPU kernels";
    register_views(m);
    register_quant(m);
    register_norm(m);
    register_attention(m);
    register_sampling(m);
    register_decoder_layer(m);
    register_lora(m);
    register_loss(m);
}
