#include "node.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "hybrid/error.h"

namespace hybrid::config {
namespace fs = std::filesystem;

Node* Node::find(const std::string& key) {
  for (auto& [k, v] : entries)
    if (k == key) return &v;
  return nullptr;
}

const Node* Node::find(const std::string& key) const {
  return const_cast<Node*>(this)->find(key);
}

Node& Node::get_or_add(const std::string& key, const std::string& where) {
  if (Node* n = find(key)) return *n;
  entries.emplace_back(key, Node{});
  entries.back().second.origin = where;
  return entries.back().second;
}

namespace {

std::string mark_str(const std::string& name, const YAML::Mark& m) {
  return name + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1);
}

Node convert(const YAML::Node& y, const std::string& name) {
  Node n;
  n.origin = mark_str(name, y.Mark());
  switch (y.Type()) {
    case YAML::NodeType::Scalar: n.kind = Node::Kind::Scalar; n.scalar = y.Scalar(); break;
    case YAML::NodeType::Sequence:
      n.kind = Node::Kind::List;
      for (const auto& item : y) n.items.push_back(convert(item, name));
      break;
    case YAML::NodeType::Map: {
      n.kind = Node::Kind::Map;
      std::set<std::string> seen;
      for (const auto& kv : y) {
        if (!kv.first.IsScalar())
          throw ConfigError(mark_str(name, kv.first.Mark()) + ": map keys must be plain names");
        std::string key = kv.first.Scalar();
        if (!seen.insert(key).second)
          throw ConfigError(mark_str(name, kv.first.Mark()) + ": key '" + key + "' appears twice");
        n.entries.emplace_back(key, convert(kv.second, name));
      }
      break;
    }
    default: n.kind = Node::Kind::Null; break;
  }
  return n;
}

Node load_chain(const fs::path& path, std::vector<fs::path>& stack) {
  std::error_code ec;
  fs::path canonical = fs::weakly_canonical(path, ec);
  for (const auto& p : stack)
    if (p == canonical) throw ConfigError(path.string() + ": `base:` includes form a cycle");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(path.string() + ": cannot open config file");
  std::stringstream text;
  text << in.rdbuf();
  Node node = parse_yaml(text.str(), path.string());
  if (node.kind == Node::Kind::Null) node.kind = Node::Kind::Map;  // an empty file
  if (node.kind != Node::Kind::Map)
    throw ConfigError(node.origin + ": a config file must be a map of keys at the top level");

  const Node* base = node.find("base");
  if (!base) return node;
  if (base->kind != Node::Kind::Scalar || base->scalar.empty())
    throw ConfigError(base->origin + ": base: expected a file name");
  stack.push_back(canonical);
  Node merged = load_chain(path.parent_path() / base->scalar, stack);
  stack.pop_back();
  std::erase_if(node.entries, [](const auto& kv) { return kv.first == "base"; });
  std::erase_if(merged.entries, [](const auto& kv) { return kv.first == "base"; });
  merge_into(merged, node);
  return merged;
}

}  // namespace

Node parse_yaml(const std::string& text, const std::string& name) {
  try {
    return convert(YAML::Load(text), name);
  } catch (const YAML::Exception& e) {
    throw ConfigError(mark_str(name, e.mark) + ": YAML syntax error: " + e.msg);
  }
}

Node load_yaml_with_bases(const std::string& path) {
  std::vector<fs::path> stack;
  return load_chain(path, stack);
}

void merge_into(Node& base, const Node& top) {
  if (base.kind != Node::Kind::Map || top.kind != Node::Kind::Map) {
    base = top;
    return;
  }
  for (const auto& [key, value] : top.entries) {
    if (Node* existing = base.find(key))
      merge_into(*existing, value);
    else
      base.entries.emplace_back(key, value);
  }
}

namespace {

// One step of an override's path: a map's key (added when missing) or, for index >= 0, a list's
// item. A map indexed by 0 is its own first item, as the loader reads one map where a list of
// maps goes.
Node& step_into(Node& node, const std::string& key, long index, const std::string& walked, const std::string& where) {
  if (index >= 0) {
    const size_t count = node.kind == Node::Kind::List ? node.items.size() : node.kind == Node::Kind::Map ? 1 : 0;
    if (node.kind == Node::Kind::Null)
      throw ConfigError(where + ": '" + walked + "' is not in the config files: set the whole list (" + walked + "=[...])");
    if (node.kind != Node::Kind::List && node.kind != Node::Kind::Map)
      throw ConfigError(where + ": '" + walked + "' is not a list");
    if (static_cast<size_t>(index) >= count)
      throw ConfigError(where + ": '" + walked + "' has " + std::to_string(count) + " item" + (count == 1 ? "" : "s") +
                        " (indices from 0)");
    return node.kind == Node::Kind::List ? node.items[index] : node;
  }
  if (node.kind == Node::Kind::Null) node.kind = Node::Kind::Map;
  if (node.kind == Node::Kind::List)
    throw ConfigError(where + ": '" + walked + "' is a list: name an item by its index, e.g. " + walked + "[0]." + key);
  if (node.kind != Node::Kind::Map) throw ConfigError(where + ": '" + walked + "' is not a section");
  return node.get_or_add(key, where);
}

bool all_digits(const std::string& s) {
  return !s.empty() && s.size() < 10 && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}

}  // namespace

void apply_override(Node& root, const std::string& assignment) {
  const std::string where = "--set " + assignment;
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError(where + ": expected key.path=value");
  std::string path = assignment.substr(0, eq);
  Node value = parse_yaml(assignment.substr(eq + 1), "--set " + path);
  // The path's steps: keys, and list indices written as key[N] or key.N.
  std::vector<std::pair<std::string, long>> steps;
  std::stringstream ss(path);
  for (std::string part; std::getline(ss, part, '.');) {
    const std::string key = part.substr(0, part.find('['));
    if (key.empty() && steps.empty()) throw ConfigError(where + ": empty key in '" + path + "'");
    if (all_digits(key) && !steps.empty())
      steps.emplace_back("", std::stol(key));
    else if (!key.empty())
      steps.emplace_back(key, -1);
    else if (part.empty() || part[0] != '[')
      throw ConfigError(where + ": empty key in '" + path + "'");
    for (size_t at = key.size(); at < part.size();) {
      const size_t close = part.find(']', at);
      const std::string digits = close == std::string::npos ? "" : part.substr(at + 1, close - at - 1);
      if (part[at] != '[' || !all_digits(digits))
        throw ConfigError(where + ": '" + part + "' in '" + path + "': expected key or key[N]");
      steps.emplace_back("", std::stol(digits));
      at = close + 1;
    }
  }
  auto set_origin = [&](auto&& self, Node& n) -> void {
    n.origin = where;
    for (auto& item : n.items) self(self, item);
    for (auto& [k, v] : n.entries) self(self, v);
  };
  set_origin(set_origin, value);
  Node* node = &root;
  std::string walked;
  for (const auto& [key, index] : steps) {
    node = &step_into(*node, key, index, walked, where);
    walked += index >= 0 ? "[" + std::to_string(index) + "]" : (walked.empty() ? "" : ".") + key;
  }
  if (value.kind == Node::Kind::Map)
    merge_into(*node, value);
  else
    *node = value;
}

}  // namespace hybrid::config
