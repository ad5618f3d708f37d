// A plain YAML-like tree with the origin ("file:line:col") of every node, so merged
// configs (base files plus --set overrides) can still say where a bad value came from.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace hybrid::config {

struct Node {
  enum class Kind { Null, Scalar, List, Map };
  Kind kind = Kind::Null;
  std::string scalar;
  std::vector<Node> items;                             // List
  std::vector<std::pair<std::string, Node>> entries;   // Map, in file order
  std::string origin;

  Node* find(const std::string& key);
  const Node* find(const std::string& key) const;
  Node& get_or_add(const std::string& key, const std::string& origin);
};

// Parses YAML text; syntax errors become ConfigError "<name>:<line>:<col>: ...".
Node parse_yaml(const std::string& text, const std::string& name);

// Loads a file and the chain of files named by its `base:` key (relative to the file).
Node load_yaml_with_bases(const std::string& path);

// Overlays `top` onto `base`: maps merge key by key, anything else is replaced.
void merge_into(Node& base, const Node& top);

// Applies "a.b.c=value" (value parsed as YAML: scalar, [list] or {map}).
void apply_override(Node& root, const std::string& assignment);

}  // namespace hybrid::config
