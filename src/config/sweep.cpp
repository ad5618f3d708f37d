#include "hybrid/config/sweep.h"

#include <cctype>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "hybrid/error.h"
#include "hybrid/util/fs.h"
#include "node.h"

namespace hybrid {
namespace {
using config::Node;

// A node back to inline YAML text, as --set parses it.
std::string to_yaml(const Node& n) {
  switch (n.kind) {
    case Node::Kind::Scalar: return n.scalar.find_first_of(",[]{}: ") == std::string::npos ? n.scalar : "'" + n.scalar + "'";
    case Node::Kind::List: {
      std::string s = "[";
      for (size_t i = 0; i < n.items.size(); ++i) s += (i ? ", " : "") + to_yaml(n.items[i]);
      return s + "]";
    }
    case Node::Kind::Map: {
      std::string s = "{";
      for (size_t i = 0; i < n.entries.size(); ++i) s += (i ? ", " : "") + n.entries[i].first + ": " + to_yaml(n.entries[i].second);
      return s + "}";
    }
    default: return "";
  }
}

// "optimizer.lr" -> "lr": the last key names the axis in run names, with the list item it is in
// ("data.sources[1].weight" or "data.sources.1.weight" -> "sources1.weight").
std::string short_key(const std::string& key) {
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string part; std::getline(ss, part, '.');) parts.push_back(part);
  auto is_index = [](const std::string& p) { return !p.empty() && std::isdigit(static_cast<unsigned char>(p[0])); };
  std::string name = parts.back();
  size_t i = parts.size() - 1;
  if (i > 0 && is_index(parts[i - 1]) && i > 1)
    name = parts[i - 2] + parts[i - 1] + "." + name;
  else if (i > 0 && parts[i - 1].find('[') != std::string::npos)
    name = parts[i - 1] + "." + name;
  std::erase_if(name, [](char c) { return c == '[' || c == ']'; });
  return name;
}

std::string safe(const std::string& s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' || c == '=' || c == ',') ? c : '_';
  return out;
}

}  // namespace

Sweep expand_sweep(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open sweep file");
  Node root = config::parse_yaml(util::read_text_file(path), path);
  if (root.kind != Node::Kind::Map) throw ConfigError(root.origin + ": a sweep file must be a map (name, grid, zip, set)");
  Sweep sweep;
  sweep.name = std::filesystem::path(path).stem().string();
  std::vector<std::pair<std::string, std::vector<std::string>>> grid, zip;
  std::vector<std::string> common;
  for (const auto& [key, value] : root.entries) {
    if (key == "name") {
      if (value.kind != Node::Kind::Scalar) throw ConfigError(value.origin + ": name: expected a string");
      sweep.name = value.scalar;
    } else if (key == "grid" || key == "zip" || key == "set") {
      if (value.kind != Node::Kind::Map) throw ConfigError(value.origin + ": " + key + ": expected a map of config keys");
      for (const auto& [k, v] : value.entries) {
        if (key == "set") {
          common.push_back(k + "=" + to_yaml(v));
          continue;
        }
        if (v.kind != Node::Kind::List || v.items.empty())
          throw ConfigError(v.origin + ": " + key + "." + k + ": expected a non-empty list of values");
        std::vector<std::string> values;
        for (const auto& item : v.items) values.push_back(to_yaml(item));
        (key == "grid" ? grid : zip).emplace_back(k, values);
      }
    } else {
      throw ConfigError(value.origin + ": unknown sweep key '" + key + "' (name, grid, zip, set)");
    }
  }
  for (const auto& [k, values] : zip)
    if (values.size() != zip.front().second.size())
      throw ConfigError(path + ": zip." + k + " has " + std::to_string(values.size()) + " values, zip." + zip.front().first +
                        " has " + std::to_string(zip.front().second.size()));

  // Runs: the zip index outermost (or one pass without zip), then the grid's combinations.
  const size_t zip_len = zip.empty() ? 1 : zip.front().second.size();
  size_t grid_len = 1;
  for (const auto& [k, values] : grid) grid_len *= values.size();
  std::set<std::string> names;
  for (size_t z = 0; z < zip_len; ++z) {
    for (size_t g = 0; g < grid_len; ++g) {
      SweepRun run;
      run.overrides = common;
      std::string name;
      auto add = [&](const std::string& key, const std::string& value) {
        run.overrides.push_back(key + "=" + value);
        name += (name.empty() ? "" : ",") + short_key(key) + "=" + value;
      };
      for (const auto& [k, values] : zip) add(k, values[z]);
      size_t rest = g;  // mixed-radix digits of g, the last grid axis varying fastest
      std::vector<std::string> picked(grid.size());
      for (size_t a = grid.size(); a-- > 0;) {
        picked[a] = grid[a].second[rest % grid[a].second.size()];
        rest /= grid[a].second.size();
      }
      for (size_t a = 0; a < grid.size(); ++a) add(grid[a].first, picked[a]);
      run.name = safe(name.empty() ? "base" : name);
      if (!names.insert(run.name).second) throw ConfigError(path + ": two runs would be named '" + run.name + "'");
      sweep.runs.push_back(std::move(run));
    }
  }
  return sweep;
}

}  // namespace hybrid
