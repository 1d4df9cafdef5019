// The native gRPC front end: gRPC's C++ API on the server's port, relaying every call's
// messages to the Python server over a Unix socket (server/front_end.py), so that the Python event
// loop never runs gRPC's own per-message work (grpc.aio costs 0.25 to 0.30 ms of CPU a streamed
// message there, the C++ API 0.11 to 0.13: docs/performance.md).
//
// It knows nothing of rnnlm's API: a generic service takes every method as a stream of raw
// messages, and Python decides what each method is, answers it, or refuses it.
//
//     rnnlm_front_end --listen HOST:PORT --socket PATH [--hold 1] [--arg NAME=INT]...
//                     [--tls-dir DIR [--tls-mutual 1]]
//
// It connects to PATH (Python listens there), opens the port, and says so with a READY frame.
// With --tls-dir it serves TLS with DIR's identity.pem (the private key and the certificate
// chain, in one file so that no read pairs one's old and the other's new version), and with
// --tls-mutual requires client certificates from DIR's ca.pem. Python writes those files after
// checking them, and again on a reload: gRPC's file watcher reads them every second, so a new
// handshake gets a rotated certificate within a second of the reload.
// It ends when the socket closes (the server stopped or died), when the parent dies
// (PR_SET_PDEATHSIG), or after a SHUTDOWN frame: GOAWAY to every connection, the calls in
// flight get the grace the frame names, then they are cancelled.
//
// Frames, both ways, little-endian:
//
//     +-----------+-----------+--------+-----------------------+
//     | u32 size  | u64 call  | u8 kind| payload (size - 9)    |
//     +-----------+-----------+--------+-----------------------+
//
//   to Python:   START     f64 the deadline, in seconds since the Unix epoch (inf: none),
//                          the system clock's, which Python reads too, str method, str peer,
//                          u32 count, then count x (str key, str value): the client's metadata;
//                          u8 1 and str the call's first request with it, or u8 0
//                MESSAGE   a request message, as received
//                HALF      the client sent its last message
//                CANCEL    the call is over for the client (cancelled, deadline, connection)
//                READY     (call 0) u32 the bound port
//   from Python: MESSAGE   a response message
//                FINISH    u32 status code, str details, u32 count, count x (str key, str value):
//                          the trailing metadata
//                ACK       a request message was taken (a call reads on while fewer than
//                          WINDOW of its messages wait in Python); with --hold, the first
//                          ACK of a call lets it read at all
//                SHUTDOWN  (call 0) f64 the grace in seconds
//   (str: u32 length, then the bytes)
//
// Build: g++ -O2 -std=c++17 server/front_end.cc $(pkg-config --cflags --libs grpc++)
// (setup.py does it where Debian's libgrpc++-dev, or another grpc++ with pkg-config, is found).
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

enum Kind : uint8_t {
  START = 1,
  MESSAGE = 2,
  HALF = 3,
  CANCEL = 4,
  FINISH = 5,
  SHUTDOWN = 6,
  READY = 7,
  ACK = 8,
};

// With --hold, a call's first request is read only once the server acknowledges the call:
// what an interceptor refuses (a call without a valid token) is never received, however large.
bool hold_requests = false;
constexpr int WINDOW = 8;                      // request messages a call may have waiting in Python
constexpr size_t MAX_QUEUED = 64u << 20;       // response bytes a call may have waiting for its client
constexpr uint32_t MAX_FRAME = 1u << 31;       // a frame from Python larger than this is a bug

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "rnnlm front end: %s\n", what);
  std::fflush(stderr);
  _exit(1);
}

// ---- frames ------------------------------------------------------------------------------------

struct FrameBuilder {
  std::string out;
  FrameBuilder(uint64_t call, Kind kind) {
    out.resize(4);
    put(&call, 8);
    out.push_back(static_cast<char>(kind));
  }
  void put(const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
  void u32(uint32_t v) { put(&v, 4); }
  void f64(double v) { put(&v, 8); }
  void str(const char* p, size_t n) {
    u32(static_cast<uint32_t>(n));
    put(p, n);
  }
  std::string done() {
    uint32_t size = static_cast<uint32_t>(out.size() - 4);
    std::memcpy(&out[0], &size, 4);
    return std::move(out);
  }
};

struct Reader {  // a payload, read front to back; `ok` false once it ran short
  const char* p;
  size_t left;
  bool ok = true;
  bool take(void* dst, size_t n) {
    if (n > left) return ok = false;
    std::memcpy(dst, p, n);
    p += n;
    left -= n;
    return true;
  }
  uint32_t u32() {
    uint32_t v = 0;
    take(&v, 4);
    return v;
  }
  double f64() {
    double v = 0;
    take(&v, 8);
    return v;
  }
  std::string str() {
    uint32_t n = u32();
    if (n > left) {
      ok = false;
      return {};
    }
    std::string s(p, n);
    p += n;
    left -= n;
    return s;
  }
};

// Frames to Python are written by the thread that makes them, one send(2) a frame, always under
// `state_mu` (below) but for READY, sent before the other threads start. A thread of its own
// with a buffer between cost more (a wake-up and a switch a frame) than the writes it joined. A
// full socket (the server's event loop behind) holds the caller.
int python_fd = -1;

void send_frame(const std::string& frame) {
  size_t at = 0;
  while (at < frame.size()) {
    ssize_t n = ::send(python_fd, frame.data() + at, frame.size() - at, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("the server's socket closed");
    at += static_cast<size_t>(n);
  }
}

std::string bytes_of(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// ---- calls ------------------------------------------------------------------------------------
//
// gRPC's asynchronous API with one completion queue: one thread takes every call's completions
// (a new call, a request read, a reply written, the call done), and the socket's reader thread
// starts the operations the server's frames ask for (a reply, the status, the next read) itself.
// Measured against gRPC's callback API, whose reactions ran on a pool of threads: 0.19 to 0.20
// against 0.30 to 0.32 ms of this process's CPU a PredictNext (the C++ echo's is 0.18 to 0.22).
// Handing the frames to the queue's thread with a grpc::Alarm instead cost a millisecond of
// latency a call: the alarm waits for gRPC's timer thread.

enum What { NEW, READ, WRITE, FINISHED, DONE };

struct Call;
struct Op {
  Call* call;
  What what;
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

grpc::ServerCompletionQueue* cq = nullptr;
grpc::AsyncGenericService* service = nullptr;
// Every call's state, the map and the operations started on calls are under `state_mu`: the
// queue's thread takes it for each completion, the socket's reader for each frame. Starting an
// operation never runs a completion inline (they come through the queue), so holding it there
// is safe.
std::mutex state_mu;
std::unordered_map<uint64_t, Call*> calls;
uint64_t next_call = 1;

struct Call {
  explicit Call(uint64_t i) : id(i), stream(&ctx) {}
  uint64_t id;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer in, current;
  size_t current_size = 0;
  std::deque<std::string> out;
  size_t queued_bytes = 0;
  bool started = false;  // the server has its START
  bool reading = false, writing = false, half = false;
  bool finishing = false, finished = false, finish_done = false, done = false;
  int waiting = 0;  // requests sent to the server and not yet taken
  grpc::Status status;
  Metadata trailing;
  Op new_op{this, NEW}, read_op{this, READ}, write_op{this, WRITE};
  Op finish_op{this, FINISHED}, done_op{this, DONE};
};

void request_call() {
  Call* c = new Call(next_call++);
  c->ctx.AsyncNotifyWhenDone(&c->done_op);
  service->RequestCall(&c->ctx, &c->stream, cq, cq, &c->new_op);
}

void to_python(const Call* c, Kind kind) {
  FrameBuilder f(c->id, kind);
  send_frame(f.done());
}

// START: f64 the deadline (Unix time: a time to the deadline would grow by however long the
// frame took to reach Python), str method, str peer, u32 count and the metadata, then
// u8 1 and str the first request when it comes with it (else u8 0).
void send_start(Call* c, const std::string* first) {
  FrameBuilder f(c->id, START);
  auto deadline = c->ctx.deadline();
  double seconds = std::numeric_limits<double>::infinity();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    seconds = std::chrono::duration<double>(deadline.time_since_epoch()).count();
  }
  f.f64(seconds);
  f.str(c->ctx.method().data(), c->ctx.method().size());
  std::string peer = c->ctx.peer();
  f.str(peer.data(), peer.size());
  const auto& meta = c->ctx.client_metadata();
  f.u32(static_cast<uint32_t>(meta.size()));
  for (const auto& kv : meta) {
    f.str(kv.first.data(), kv.first.size());
    f.str(kv.second.data(), kv.second.size());
  }
  uint8_t with = first != nullptr;
  f.put(&with, 1);
  if (first != nullptr) f.str(first->data(), first->size());
  send_frame(f.done());
  c->started = true;
}

void read_next(Call* c) {
  c->reading = true;
  c->stream.Read(&c->in, &c->read_op);
}

void write_next(Call* c) {
  std::string& next = c->out.front();
  c->current_size = next.size();
  grpc::Slice slice(next.data(), next.size());
  c->current = grpc::ByteBuffer(&slice, 1);
  c->out.pop_front();
  c->writing = true;
  c->stream.Write(c->current, &c->write_op);
}

void forget(Call* c) {  // once gRPC holds nothing of it
  if (c->done && c->finish_done && !c->reading && !c->writing) {
    calls.erase(c->id);
    delete c;
  }
}

void add_trailing(Call* c) {
  for (const auto& [key, value] : c->trailing) c->ctx.AddTrailingMetadata(key, value);
}

void maybe_finish(Call* c) {
  if (!c->finishing || c->finished || c->writing || !c->out.empty()) return;
  c->finished = true;
  add_trailing(c);
  c->stream.Finish(c->status, &c->finish_op);
}

void end_for_client(Call* c, grpc::Status status) {  // the call is over on the client's side
  if (c->finishing) return;
  c->finishing = true;
  c->status = std::move(status);
  c->out.clear();
  if (c->started) to_python(c, CANCEL);
}

// A new call. Its START goes with its first request (a unary call costs one frame each way),
// or at once when requests are held until the server acknowledges the call.
void on_new(Call* c, bool ok) {
  if (!ok) return;  // shutting down: the process exits
  request_call();
  calls[c->id] = c;
  if (hold_requests) {
    send_start(c, nullptr);
    c->waiting = 1;  // the first read waits for the server's ACK
    return;
  }
  read_next(c);
}

// After a call's first request nothing more is read until the server takes it; later ones are
// read ahead while fewer than WINDOW wait in the server. A unary call never reads its half-close.
void on_read(Call* c, bool ok) {
  c->reading = false;
  if (c->finishing) {
    forget(c);
    return;
  }
  if (!ok) {
    c->half = true;
    if (!c->started) send_start(c, nullptr);
    to_python(c, HALF);
  } else if (!c->started) {
    std::string body = bytes_of(c->in);
    send_start(c, &body);
    c->waiting++;
  } else {
    FrameBuilder f(c->id, MESSAGE);
    std::string body = bytes_of(c->in);
    f.put(body.data(), body.size());
    send_frame(f.done());
    c->waiting++;
    if (c->waiting < WINDOW) read_next(c);
  }
}

void on_write(Call* c, bool ok) {
  c->writing = false;
  c->queued_bytes -= c->current_size;
  if (!ok) {
    end_for_client(c, grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  } else if (!c->out.empty()) {
    write_next(c);
  }
  maybe_finish(c);
  forget(c);
}

void on_done(Call* c) {
  c->done = true;
  if (c->ctx.IsCancelled()) end_for_client(c, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  maybe_finish(c);
  forget(c);
}

// ---- the server's frames, on the socket's reader thread (under state_mu) ----------------------

void python_message(Call* c, const char* p, size_t n) {
  if (c->finishing) return;
  c->queued_bytes += n;
  if (c->queued_bytes > MAX_QUEUED) {
    end_for_client(c, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                   "the client reads the responses too slowly"));
    maybe_finish(c);
    return;
  }
  c->out.emplace_back(p, n);
  if (!c->writing) write_next(c);
}

// The call's status and trailing metadata from a FINISH frame (INTERNAL when it is malformed);
// the call is finishing from now on.
void take_finish(Call* c, const char* p, size_t n) {
  c->finishing = true;
  Reader r{p, n};
  auto code = static_cast<grpc::StatusCode>(r.u32());
  std::string details = r.str();
  uint32_t count = r.u32();
  for (uint32_t i = 0; r.ok && i < count; i++) {
    std::string key = r.str();
    std::string value = r.str();
    c->trailing.emplace_back(std::move(key), std::move(value));
  }
  if (r.ok && static_cast<uint32_t>(code) <= 16) {
    c->status = grpc::Status(code, details);
  } else {
    c->status = grpc::Status(grpc::StatusCode::INTERNAL, "a malformed reply from the server");
    c->trailing.clear();
  }
}

void python_finish(Call* c, const char* p, size_t n) {
  if (c->finishing) return;
  take_finish(c, p, n);
  maybe_finish(c);
}

// A response and the status after it (a unary call's answer): one operation when nothing is
// being written.
void python_last(Call* c, const char* p, size_t n, const char* f, size_t fn) {
  if (c->finishing) return;
  if (c->writing || !c->out.empty()) {
    python_message(c, p, n);
    python_finish(c, f, fn);
    return;
  }
  take_finish(c, f, fn);
  c->finished = true;
  add_trailing(c);
  grpc::Slice slice(p, n);
  c->current = grpc::ByteBuffer(&slice, 1);
  c->stream.WriteAndFinish(c->current, grpc::WriteOptions(), c->status, &c->finish_op);
}

void python_ack(Call* c) {
  if (c->waiting > 0) c->waiting--;
  if (!c->reading && !c->half && !c->finishing && c->waiting < WINDOW) read_next(c);
}

// One frame (or a response and the FINISH right after it: `f` set), under state_mu.
void handle(uint64_t id, Kind kind, const char* p, size_t n, const char* f, size_t fn) {
  auto it = calls.find(id);
  if (it == calls.end()) return;  // over already: the server learnt it from the CANCEL
  Call* c = it->second;
  if (f != nullptr) python_last(c, p, n, f, fn);
  else if (kind == MESSAGE) python_message(c, p, n);
  else if (kind == ACK) python_ack(c);
  else if (kind == FINISH) python_finish(c, p, n);
  forget(c);
}

void run_queue() {
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) {
    std::lock_guard<std::mutex> lock(state_mu);
    Op* op = static_cast<Op*>(tag);
    Call* c = op->call;
    switch (op->what) {
      case NEW: on_new(c, ok); break;
      case READ: on_read(c, ok); break;
      case WRITE: on_write(c, ok); break;
      case FINISHED:
        c->finish_done = true;
        forget(c);
        break;
      case DONE: on_done(c); break;
    }
  }
}

// ---- from Python: the socket's reader thread -------------------------------------------------

std::mutex shutdown_mu;
std::condition_variable shutdown_cv;
bool shutdown_asked = false;
double shutdown_grace = 0;

void ask_shutdown(double grace) {
  {
    std::lock_guard<std::mutex> lock(shutdown_mu);
    if (shutdown_asked) return;
    shutdown_asked = true;
    shutdown_grace = grace;
  }
  shutdown_cv.notify_all();
}

struct Head {
  uint32_t size;
  uint64_t id;
  Kind kind;
};

Head head_at(const char* p) {
  Head h;
  std::memcpy(&h.size, p, 4);
  std::memcpy(&h.id, p + 4, 8);
  h.kind = static_cast<Kind>(p[12]);
  if (h.size < 9 || h.size > MAX_FRAME) die("a malformed frame from the server");
  return h;
}

// Frames from Python, read as many as the socket holds at a time and handled under one lock. A
// response followed by its call's FINISH in the same read goes as one operation.
void read_python(int fd) {
  std::vector<char> buf(1 << 16);
  size_t have = 0;
  for (;;) {
    ssize_t got = ::read(fd, buf.data() + have, buf.size() - have);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    have += static_cast<size_t>(got);
    size_t at = 0;
    {
      std::lock_guard<std::mutex> lock(state_mu);
      while (have - at >= 13) {
        Head h = head_at(buf.data() + at);
        size_t total = 4 + static_cast<size_t>(h.size);
        if (have - at < total) break;
        const char* payload = buf.data() + at + 13;
        size_t next = at + total;
        const char* finish = nullptr;
        size_t finish_size = 0;
        if (h.kind == MESSAGE && have - next >= 13) {
          Head fh = head_at(buf.data() + next);
          size_t ftotal = 4 + static_cast<size_t>(fh.size);
          if (fh.kind == FINISH && fh.id == h.id && have - next >= ftotal) {
            finish = buf.data() + next + 13;
            finish_size = fh.size - 9;
            next += ftotal;
          }
        }
        if (h.id == 0) {
          if (h.kind == SHUTDOWN) ask_shutdown(Reader{payload, h.size - 9u}.f64());
        } else {
          handle(h.id, h.kind, payload, h.size - 9, finish, finish_size);
        }
        at = next;
      }
    }
    std::memmove(buf.data(), buf.data() + at, have - at);
    have -= at;
    if (have >= 13) {  // a frame larger than the buffer: make room for all of it
      size_t total = 4 + static_cast<size_t>(head_at(buf.data()).size);
      if (total > buf.size()) buf.resize(total);
    }
  }
  ask_shutdown(0);  // the server closed its end: it stopped or died
}

// TLS from the files Python keeps in `dir` (see the header), or plaintext without a `dir`.
std::shared_ptr<grpc::ServerCredentials> credentials(const std::string& dir, bool mutual) {
  if (dir.empty()) return grpc::InsecureServerCredentials();
  namespace tls = grpc::experimental;
  const unsigned refresh_seconds = 1;
  const std::string identity = dir + "/identity.pem";  // the key and the chain (header)
  auto files = mutual ? std::make_shared<tls::FileWatcherCertificateProvider>(
                            identity, identity, dir + "/ca.pem", refresh_seconds)
                      : std::make_shared<tls::FileWatcherCertificateProvider>(
                            identity, identity, refresh_seconds);
  tls::TlsServerCredentialsOptions options(files);
  options.watch_identity_key_cert_pairs();
  if (mutual) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return tls::TlsServerCredentials(options);
}

int connect_to(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) die("--socket: the path is too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    die("--socket: cannot connect to the server");
  }
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  std::string listen, socket_path, tls_dir;
  bool tls_mutual = false;
  std::vector<std::pair<std::string, int>> args;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--listen") {
      listen = value;
    } else if (flag == "--socket") {
      socket_path = value;
    } else if (flag == "--hold") {
      hold_requests = value == "1";
    } else if (flag == "--tls-dir") {
      tls_dir = value;
    } else if (flag == "--tls-mutual") {
      tls_mutual = value == "1";
    } else if (flag == "--arg") {
      auto eq = value.find('=');
      if (eq == std::string::npos) die("--arg: NAME=INT");
      args.emplace_back(value.substr(0, eq), std::atoi(value.c_str() + eq + 1));
    } else {
      die("usage: rnnlm_front_end --listen HOST:PORT --socket PATH [--hold 1] [--arg NAME=INT]... "
          "[--tls-dir DIR [--tls-mutual 1]]");
    }
  }
  if (listen.empty() || socket_path.empty()) die("--listen and --socket are required");
  int fd = connect_to(socket_path);
  python_fd = fd;

  grpc::AsyncGenericService generic;
  service = &generic;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, credentials(tls_dir, tls_mutual), &port);
  for (const auto& [name, value] : args) builder.AddChannelArgument(name, value);
  builder.RegisterAsyncGenericService(&generic);
  std::unique_ptr<grpc::ServerCompletionQueue> queue = builder.AddCompletionQueue();
  cq = queue.get();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  FrameBuilder ready(0, READY);
  ready.u32(server ? static_cast<uint32_t>(port) : 0u);
  send_frame(ready.done());  // sent when this returns
  if (!server) die("cannot listen on --listen");
  {
    std::lock_guard<std::mutex> lock(state_mu);
    for (int i = 0; i < 8; i++) request_call();  // calls arriving together each find a slot
  }
  std::thread(run_queue).detach();
  std::thread(read_python, fd).detach();
  double grace;
  {
    std::unique_lock<std::mutex> lock(shutdown_mu);
    shutdown_cv.wait(lock, [] { return shutdown_asked; });
    grace = shutdown_grace;
  }
  auto ms = std::chrono::milliseconds(static_cast<int64_t>(grace * 1000));
  server->Shutdown(std::chrono::system_clock::now() + ms);
  _exit(0);
}
