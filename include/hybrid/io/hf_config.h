// HF transformers `olmo_hybrid` config.json <-> our ModelConfig. Only what HF can express
// converts to it (QK-norm over the full width, GDN pre-norm and attention post-norm blocks,
// output-norm eps 1e-5); anything else is an error naming the key.
#pragma once

#include <string>

#include "hybrid/config/config.h"

namespace hybrid::io {

// JSON text of config.json (eos_id < 0: none).
std::string to_hf_config_json(const ModelConfig& model, int64_t eos_id);

// Parses config.json text; `path` names the file in errors.
ModelConfig from_hf_config_json(const std::string& json_text, const std::string& path);

}  // namespace hybrid::io
