#pragma once
#include <pybind11/pybind11.h>

// One registration function per kernel family (csrc/<family>.cpp).
void register_views(pybind11::module_& m);
void register_quant(pybind11::module_& m);
void register_norm(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_sampling(pybind11::module_& m);
void register_decoder_layer(pybind11::module_& m);
void register_lora(pybind11::module_& m);
void register_loss(pybind11::module_& m);
