// MetaCLIP substring matching (Demystifying CLIP Data, arXiv 2309.16671, Sec. 3.2 / Alg. 1) on words.
//
// The definition: text -> " " + text + " " with each of , . ; : ? ! ` wrapped in spaces and \t \n \r
// turned into spaces; entry e matches when " " + e + " " occurs in it. Both sides of that test start
// and end with a space, so an occurrence covers whole space-separated pieces: with T = the spaced
// text's pieces between its first and last space (split on ' ', empty pieces included) and E = e's
// pieces, " e " occurs exactly when E is a contiguous run of T. So instead of an automaton over
// characters, entries go into a trie over interned word ids, and matching a text is: split once
// (punctuation becomes its own piece, nothing is copied), one hash look-up per piece, and a trie walk
// from each piece that stops at the first missing edge. Entries whose pieces cannot occur in a spaced
// text (a tab, "a,b") simply never match, as in the definition.
//
// Everything is bytes: Python hands UTF-8 (surrogatepass) buffers, and since ' ' and the punctuation
// are ASCII, splitting bytes equals splitting characters. Single-threaded by design: the curation job
// parallelises over shards with processes (fork-safe: no OpenMP here).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

constexpr uint32_t kNone = 0xFFFFFFFFu;

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ULL ^ (n * 0xff51afd7ed558ccdULL);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ mix64(v)) * 0x9fb21c651e98df25ULL;
    p += 8;
    n -= 8;
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  return mix64(h ^ v ^ (uint64_t(n) << 59));
}

inline size_t table_size(size_t n) {  // power of two, load factor <= 1/2
  size_t cap = 16;
  while (cap < 2 * n + 1) cap <<= 1;
  return cap;
}

inline uint64_t head_of(const char* p, size_t n) {  // the first <= 8 bytes, zero-padded
  uint64_t v = 0;
  std::memcpy(&v, p, n < 8 ? n : 8);
  return v;
}

// Interned words, open addressing. A slot holds the word's length and first 8 bytes, so a probe
// decides most words (<= 8 bytes) without touching the byte pool: one cache miss per look-up.
class WordTable {
 public:
  // Look-ups are split in two so a caller can prefetch the slots of a whole text before resolving
  // any: the table is larger than the caches, and the misses then overlap instead of queueing.
  void prefetch(uint64_t hash) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[hash & mask_]);
  }
  uint32_t find(const char* p, size_t n, uint64_t hash) const {
    if (slots_.empty()) return kNone;
    const uint64_t head = head_of(p, n);
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.id1 == 0) return kNone;
      if (s.len == n && s.head == head && (n <= 8 || equal_tail(s.id1 - 1, p, n))) return s.id1 - 1;
    }
  }
  uint32_t intern(const char* p, size_t n) {
    TORCH_CHECK(n < UINT32_MAX && off_.size() + 1 < kNone, "kfe MetaclipMatcher: entry too large");
    if (2 * (off_.size() + 1) > slots_.size()) grow();
    const uint64_t head = head_of(p, n);
    size_t i = hash_bytes(p, n) & mask_;
    for (;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.id1 == 0) break;
      if (s.len == n && s.head == head && (n <= 8 || equal_tail(s.id1 - 1, p, n))) return s.id1 - 1;
    }
    const uint32_t id = uint32_t(off_.size());
    off_.push_back(bytes_.size());
    bytes_.append(p, n);
    slots_[i] = {head, uint32_t(n), id + 1};
    return id;
  }
  size_t size() const { return off_.size(); }
  size_t nbytes() const { return slots_.capacity() * sizeof(Slot) + off_.capacity() * 8 + bytes_.capacity(); }

 private:
  struct Slot {
    uint64_t head;
    uint32_t len;
    uint32_t id1;  // id + 1; 0 marks an empty slot
  };
  bool equal_tail(uint32_t id, const char* p, size_t n) const {
    return std::memcmp(bytes_.data() + off_[id] + 8, p + 8, n - 8) == 0;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(table_size(std::max<size_t>(off_.size() + 1, old.size())), Slot{0, 0, 0});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.id1 == 0) continue;
      size_t i = hash_bytes(bytes_.data() + off_[s.id1 - 1], s.len) & mask_;
      while (slots_[i].id1 != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  std::vector<uint64_t> off_;
  std::string bytes_;
};

// Trie edges below the first level: (parent << 32 | word) -> child, open addressing, key and child in
// one 16-byte slot (one cache miss per edge).
class EdgeTable {
 public:
  void build(const std::vector<std::pair<uint64_t, uint32_t>>& edges) {
    slots_.assign(table_size(edges.size()), Slot{kEmpty, kNone});
    mask_ = slots_.size() - 1;
    for (const auto& [key, child] : edges) {
      size_t i = mix64(key) & mask_;
      while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
      slots_[i] = {key, child};
    }
  }
  uint32_t find(uint32_t parent, uint32_t word) const {
    const uint64_t key = (uint64_t(parent) << 32) | word;
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return slots_[i].child;
      if (slots_[i].key == kEmpty) return kNone;
    }
  }
  size_t nbytes() const { return slots_.capacity() * sizeof(Slot); }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  struct Slot {
    uint64_t key;
    uint32_t child;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

inline bool is_wrapped_punct(unsigned char c) {
  return c == ',' || c == '.' || c == ';' || c == ':' || c == '?' || c == '!' || c == '`';
}
inline bool is_space_like(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

void check_buffer(const at::Tensor& data, const at::Tensor& offsets, const char* what) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(),
              "kfe MetaclipMatcher: ", what, " bytes must be a contiguous 1-D uint8 CPU tensor");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.is_contiguous() && offsets.numel() >= 1,
              "kfe MetaclipMatcher: ", what, " offsets must be a contiguous 1-D int64 CPU tensor of n + 1 values");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[n] == data.numel(), "kfe MetaclipMatcher: ", what,
              " offsets must start at 0 and end at the byte count");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(off[i] <= off[i + 1], "kfe MetaclipMatcher: ", what, " offsets must be non-decreasing");
}

struct Piece {  // a piece of a text: bytes and their hash
  const char* p;
  size_t n;
  uint64_t hash;
};

}  // namespace

struct MetaclipMatcher : torch::CustomClassHolder {
  // entries: UTF-8 bytes of every entry back to back; offsets: (E + 1,) int64 boundaries.
  MetaclipMatcher(const at::Tensor& data, const at::Tensor& offsets) {
    check_buffer(data, offsets, "entry");
    const char* bytes = reinterpret_cast<const char*>(data.data_ptr<uint8_t>());
    const int64_t* off = offsets.data_ptr<int64_t>();
    num_entries_ = offsets.numel() - 1;
    TORCH_CHECK(num_entries_ < int64_t(INT32_MAX), "kfe MetaclipMatcher: too many entries");
    // Pass 1: split every entry on ' ' (empty pieces kept) and intern its pieces.
    std::vector<uint32_t> words, word_off{0};
    for (int64_t e = 0; e < num_entries_; ++e) {
      const char* p = bytes + off[e];
      const char* end = bytes + off[e + 1];
      for (const char* start = p;; ++p) {
        if (p == end || *p == ' ') {
          words.push_back(table_.intern(start, size_t(p - start)));
          if (p == end) break;
          start = p + 1;
        }
      }
      word_off.push_back(uint32_t(words.size()));
    }
    // Pass 2: the trie over word ids. Node w < W is the level-1 node of word w (so a text's word id
    // is its level-1 node); deeper nodes are numbered from W and reached through `edges_`.
    const uint32_t num_words = uint32_t(table_.size());
    std::unordered_map<uint64_t, uint32_t> children;  // (parent << 32 | word) -> child, build only
    std::vector<std::pair<uint32_t, int32_t>> terminal;  // (node, entry)
    uint32_t nodes = num_words;
    for (int64_t e = 0; e < num_entries_; ++e) {
      uint32_t node = words[word_off[e]];
      for (uint32_t w = word_off[e] + 1; w < word_off[e + 1]; ++w) {
        uint32_t& child = children.try_emplace((uint64_t(node) << 32) | words[w], kNone).first->second;
        if (child == kNone) {
          TORCH_CHECK(nodes < kNone, "kfe MetaclipMatcher: too many trie nodes");
          child = nodes++;
        }
        node = child;
      }
      terminal.emplace_back(node, int32_t(e));
    }
    // Node info, one 8-byte word per node: bit 63 = has children, bits 32..62 = number of entries
    // ending here, bits 0..31 = that entry itself when there is one (the common case: no extra
    // memory access), else the offset of the node's entries in term_.
    std::vector<uint32_t> count(nodes, 0), first(nodes, 0);
    for (const auto& [node, entry] : terminal)
      if (count[node]++ == 0) first[node] = uint32_t(entry);
    info_.assign(nodes, 0);
    std::vector<uint32_t> fill(nodes, 0);
    for (uint32_t n = 0; n < nodes; ++n) {
      uint64_t low = first[n];
      if (count[n] > 1) {
        low = term_.size();
        fill[n] = uint32_t(term_.size());
        term_.resize(term_.size() + count[n]);
      }
      info_[n] = (uint64_t(count[n]) << 32) | low;
    }
    for (const auto& [node, entry] : terminal)  // entries in index order: each node's run is sorted
      if (count[node] > 1) term_[fill[node]++] = entry;
    std::vector<std::pair<uint64_t, uint32_t>> edges(children.begin(), children.end());
    children = {};
    for (const auto& edge : edges) info_[edge.first >> 32] |= kHasChild;
    edges_.build(edges);
  }

  // texts: UTF-8 bytes back to back; offsets (N + 1,). Returns (entries, counts): the sorted, unique
  // matched entry indices of text i are entries[sum(counts[:i]) : sum(counts[:i+1])].
  std::tuple<at::Tensor, at::Tensor> match(const at::Tensor& data, const at::Tensor& offsets) const {
    check_buffer(data, offsets, "text");
    const char* bytes = reinterpret_cast<const char*>(data.data_ptr<uint8_t>());
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t n = offsets.numel() - 1;
    at::Tensor counts = at::empty({n}, at::kInt);
    int32_t* cnt = counts.data_ptr<int32_t>();
    std::vector<int32_t> out, found;
    std::vector<uint32_t> ids;
    std::vector<Piece> pieces;
    out.reserve(size_t(n) * 4);
    for (int64_t t = 0; t < n; ++t) {
      split(bytes + off[t], bytes + off[t + 1], pieces, ids);
      found.clear();
      walk(ids, found);
      if (found.size() > 1) {
        std::sort(found.begin(), found.end());
        found.erase(std::unique(found.begin(), found.end()), found.end());
      }
      cnt[t] = int32_t(found.size());
      out.insert(out.end(), found.begin(), found.end());
    }
    at::Tensor entries = at::empty({int64_t(out.size())}, at::kInt);
    if (!out.empty()) std::memcpy(entries.data_ptr<int32_t>(), out.data(), out.size() * sizeof(int32_t));
    return {entries, counts};
  }

  int64_t nbytes() const {
    return int64_t(table_.nbytes() + edges_.nbytes() + info_.capacity() * 8 + term_.capacity() * 4);
  }
  int64_t num_entries() const { return num_entries_; }
  int64_t num_words() const { return int64_t(table_.size()); }

 private:
  // The pieces of the spaced text between its outer spaces, as word ids (kNone: in no entry).
  // Spaces and \t \n \r end a piece; a wrapped punctuation mark ends the piece before it and is a
  // piece of its own (" , " puts spaces on both sides); the text's end ends the last piece.
  // Three sweeps (cut + hash + prefetch slot, resolve + prefetch node, walk) keep the cache misses of
  // one text in flight together.
  void split(const char* p, const char* end, std::vector<Piece>& pieces, std::vector<uint32_t>& ids) const {
    pieces.clear();
    const char* start = p;
    for (; p != end; ++p) {
      const unsigned char c = static_cast<unsigned char>(*p);
      if (is_space_like(c)) {
        add_piece(pieces, start, p);
        start = p + 1;
      } else if (is_wrapped_punct(c)) {
        add_piece(pieces, start, p);
        add_piece(pieces, p, p + 1);
        start = p + 1;
      }
    }
    add_piece(pieces, start, end);
    ids.resize(pieces.size());
    for (size_t k = 0; k < pieces.size(); ++k) {
      ids[k] = table_.find(pieces[k].p, pieces[k].n, pieces[k].hash);
      if (ids[k] != kNone) __builtin_prefetch(&info_[ids[k]]);
    }
  }

  void add_piece(std::vector<Piece>& pieces, const char* start, const char* stop) const {
    const size_t n = size_t(stop - start);
    const uint64_t hash = hash_bytes(start, n);
    table_.prefetch(hash);
    pieces.push_back({start, n, hash});
  }

  void walk(const std::vector<uint32_t>& ids, std::vector<int32_t>& found) const {
    const size_t n = ids.size();
    for (size_t i = 0; i < n; ++i) {
      uint32_t node = ids[i];  // a word id is its level-1 node
      for (size_t j = i + 1; node != kNone; ++j) {
        const uint64_t info = info_[node];
        const uint32_t ends = uint32_t(info >> 32) & 0x7FFFFFFFu, low = uint32_t(info);
        if (ends == 1) found.push_back(int32_t(low));
        else if (ends > 1) found.insert(found.end(), term_.begin() + low, term_.begin() + low + ends);
        if (!(info & kHasChild) || j == n || ids[j] == kNone) break;
        node = edges_.find(node, ids[j]);
      }
    }
  }

  static constexpr uint64_t kHasChild = uint64_t(1) << 63;
  int64_t num_entries_ = 0;
  WordTable table_;
  EdgeTable edges_;
  std::vector<uint64_t> info_;
  std::vector<int32_t> term_;
};

TORCH_LIBRARY_FRAGMENT(kfe, m) {
  m.class_<MetaclipMatcher>("MetaclipMatcher")
      .def(torch::init<at::Tensor, at::Tensor>())
      .def("match", &MetaclipMatcher::match)
      .def("nbytes", &MetaclipMatcher::nbytes)
      .def("num_entries", &MetaclipMatcher::num_entries)
      .def("num_words", &MetaclipMatcher::num_words);
}
