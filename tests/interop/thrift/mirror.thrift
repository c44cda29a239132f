// The service the Thrift interop peer (peer.py, next to this file) serves and calls, for the
// Rust end-to-end tests. Python code is generated from it at run time; nothing generated is
// committed. Keep it small: a reply, a void reply, a declared exception, a oneway call, an i64.

namespace py mirror

exception NotFound { 1: string key }

service Store {
  string get(1: string key) throws (1: NotFound missing),
  void put(1: string key, 2: string value),
  oneway void log(1: string line),
  i64 add(1: i64 a, 2: i64 b)
}
