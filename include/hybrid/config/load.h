// Reading configuration: a YAML file (following `base:` includes), then `--set key.path=value`
// overrides, into a validated Config. Any problem throws ConfigError naming file and key.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "hybrid/config/config.h"

namespace hybrid {

struct LoadedConfig {
  Config config;
  // Where each leaf key's value came from: "configs/x.yaml:12:3", "--set", or absent (default).
  std::map<std::string, std::string> origins;
};

LoadedConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from YAML text (a checkpoint's config.yaml); `name` stands for the file in errors.
LoadedConfig load_config_text(const std::string& yaml, const std::string& name);

// The resolved config as YAML that load_config reads back to the same Config.
std::string config_to_yaml(const Config& config);

// Checks values that types alone cannot (divisibility, ranges, pattern letters).
void validate_config(const LoadedConfig& loaded);

}  // namespace hybrid
