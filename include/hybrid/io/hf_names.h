// HF `olmo_hybrid` checkpoints on disk (as released and as save_pretrained writes them) name
// a few tensors differently from the modules in memory, which our parameters follow:
//   attention_layer_norm   <-> input_layernorm
//   feedforward_layer_norm <-> post_attention_layernorm
//   linear_attn.{q,k,v}_conv1d.weight <-> linear_attn.conv1d.weight (concatenated q, k, v)
// These map between the two, moving tensor bytes unchanged.
#pragma once

#include "hybrid/config/config.h"
#include "hybrid/io/safetensors.h"

namespace hybrid::io {

// Accepts either naming (in-memory names pass through).
NamedTensors hf_disk_to_ours(NamedTensors tensors);
NamedTensors ours_to_hf_disk(const NamedTensors& tensors, const ModelConfig& model);

}  // namespace hybrid::io
