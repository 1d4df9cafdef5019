// The native gRPC front end: gRPC's C++ callback API on the server's port, relaying every call's
// messages to the Python server over a Unix socket (server/relay.py), so that the Python event
// loop never runs gRPC's own per-message work (grpc.aio costs 0.25 to 0.30 ms of CPU a streamed
// message there, the C++ API 0.11 to 0.13: docs/performance.md).
//
// It knows nothing of rnnlm's API: a generic service takes every method as a stream of raw
// messages, and Python decides what each method is, answers it, or refuses it.
//
//     rnnlm_front_end --listen HOST:PORT --socket PATH [--hold 1] [--arg NAME=INT]...
//
// It connects to PATH (Python listens there), opens the port, and says so with a READY frame.
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
//   to Python:   START     f64 seconds to the deadline (inf: none), str method, str peer,
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
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
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

// Frames to Python are written by the thread that makes them, one frame a call of send(2): a
// thread of its own with a buffer between cost more (a wake-up and a switch a frame) than the
// writes it joined. A full socket (the server's event loop behind) holds the caller.
class Writer {
 public:
  explicit Writer(int fd) : fd_(fd) {}
  void Send(const std::string& frame) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t at = 0;
    while (at < frame.size()) {
      ssize_t n = ::send(fd_, frame.data() + at, frame.size() - at, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) die("the server's socket closed");
      at += static_cast<size_t>(n);
    }
  }

 private:
  int fd_;
  std::mutex mu_;
};

Writer* writer = nullptr;

std::string bytes_of(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// ---- a call ------------------------------------------------------------------------------------

class Call;
std::mutex calls_mu;
std::unordered_map<uint64_t, std::shared_ptr<Call>> calls;
std::atomic<uint64_t> next_call{1};

// One call's reactor. The relay's decisions are made under `mu_`, and gRPC's operations are
// started outside it (a reaction may run inline on the thread that starts an operation).
// The object lives while the map or a reaction holds it; `self_` keeps it until OnDone.
class Call : public grpc::ServerGenericBidiReactor {
 public:
  // A new call. Its START frame goes with its first request (the frames a unary call costs
  // are one each way), or at once when requests are held.
  static void Start(std::shared_ptr<Call> call) {
    call->self_ = call;
    {
      std::lock_guard<std::mutex> lock(calls_mu);
      calls[call->id_] = call;
    }
    if (hold_requests) {
      writer->Send(call->StartFrame(nullptr));
      call->started_ = true;
      call->waiting_ = 1;  // the first read waits for the server's ACK
      return;
    }
    call->reading_ = true;
    call->StartRead(&call->in_);
  }

  // START: f64 seconds to the deadline, str method, str peer, u32 count and the metadata,
  // then u8 1 and str the first request when it comes with it (else u8 0).
  std::string StartFrame(const std::string* first) {
    FrameBuilder f(id_, START);
    auto deadline = ctx_->deadline();
    double seconds = std::numeric_limits<double>::infinity();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      seconds = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
    }
    f.f64(seconds);
    f.str(ctx_->method().data(), ctx_->method().size());
    std::string peer = ctx_->peer();
    f.str(peer.data(), peer.size());
    const auto& meta = ctx_->client_metadata();
    f.u32(static_cast<uint32_t>(meta.size()));
    for (const auto& kv : meta) {
      f.str(kv.first.data(), kv.first.size());
      f.str(kv.second.data(), kv.second.size());
    }
    uint8_t with = first != nullptr;
    f.put(&with, 1);
    if (first != nullptr) f.str(first->data(), first->size());
    return f.done();
  }

  Call(uint64_t id, grpc::GenericCallbackServerContext* ctx) : id_(id), ctx_(ctx) {}

  // From Python: a response to send, the call's end, or a request taken.
  void Message(const char* p, size_t n) {
    bool start = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishing_) return;
      queued_bytes_ += n;
      if (queued_bytes_ > MAX_QUEUED) {
        status_ = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                               "the client reads the responses too slowly");
        finishing_ = true;
        out_.clear();
        SendToPython(CANCEL);
      } else {
        out_.emplace_back(p, n);
        start = !writing_;
        if (start) TakeNext();
      }
    }
    if (start) StartWrite(&current_);
    MaybeFinish();
  }

  using Metadata = std::vector<std::pair<std::string, std::string>>;

  // A response that is the call's last, then its status: one operation when nothing is
  // being written (a unary call's answer), else queued like any other.
  void WriteLast(const char* p, size_t n, grpc::Status status, Metadata trailing) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishing_) return;
      if (!writing_ && out_.empty()) {
        finishing_ = finished_ = true;
        grpc::Slice slice(p, n);
        current_ = grpc::ByteBuffer(&slice, 1);
        status_ = std::move(status);
        trailing_ = std::move(trailing);
      } else {
        out_.emplace_back(p, n);
        queued_bytes_ += n;
        finishing_ = true;
        status_ = std::move(status);
        trailing_ = std::move(trailing);
        return;  // OnWriteDone writes it, then finishes
      }
    }
    for (const auto& [key, value] : trailing_) ctx_->AddTrailingMetadata(key, value);
    StartWriteAndFinish(&current_, grpc::WriteOptions(), status_);
  }

  void Finish(grpc::Status status, Metadata trailing = {}) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishing_) return;
      finishing_ = true;
      status_ = std::move(status);
      trailing_ = std::move(trailing);
    }
    MaybeFinish();
  }

  void Ack() {
    bool read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (waiting_ > 0) waiting_--;
      read = !reading_ && !half_ && !finishing_ && waiting_ < WINDOW;
      if (read) reading_ = true;
    }
    if (read) StartRead(&in_);
  }

  // gRPC's reactions.
  // A request read (ok), or the client's half-close. After a call's first request nothing
  // more is read until the server takes it (its ACK): a unary call never reads its half-close.
  // Later requests are read ahead while fewer than WINDOW wait in the server.
  void OnReadDone(bool ok) override {
    bool read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      reading_ = false;
      if (finishing_) return;
      if (!ok) {
        half_ = true;
        if (!started_) writer->Send(StartFrame(nullptr));
        started_ = true;
        SendToPython(HALF);
      } else if (!started_) {
        std::string body = bytes_of(in_);
        writer->Send(StartFrame(&body));
        started_ = true;
        waiting_++;
      } else {
        FrameBuilder f(id_, MESSAGE);
        std::string body = bytes_of(in_);
        f.put(body.data(), body.size());
        writer->Send(f.done());
        waiting_++;
        read = waiting_ < WINDOW;
        reading_ = read;
      }
    }
    if (read) StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    bool more = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      queued_bytes_ -= current_size_;
      if (!ok) {  // the client is gone: the call ends here
        if (!finishing_) {
          finishing_ = true;
          status_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
          SendToPython(CANCEL);
        }
        out_.clear();
      } else if (!out_.empty()) {
        TakeNext();
        more = true;
      }
    }
    if (more) StartWrite(&current_);
    MaybeFinish();
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!finishing_ && started_) SendToPython(CANCEL);
    }
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(calls_mu);
      calls.erase(id_);
    }
    self_.reset();  // may destroy this object: nothing after
  }

 private:
  void SendToPython(Kind kind) {  // under mu_
    FrameBuilder f(id_, kind);
    writer->Send(f.done());
  }

  void TakeNext() {  // under mu_: the next response becomes the one being written
    std::string& next = out_.front();
    current_size_ = next.size();
    grpc::Slice slice(next.data(), next.size());
    current_ = grpc::ByteBuffer(&slice, 1);
    out_.pop_front();
    writing_ = true;
  }

  void MaybeFinish() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!finishing_ || finished_ || writing_ || !out_.empty()) return;
      finished_ = true;
    }
    for (const auto& [key, value] : trailing_) ctx_->AddTrailingMetadata(key, value);
    grpc::ServerGenericBidiReactor::Finish(status_);
  }

  const uint64_t id_;
  grpc::GenericCallbackServerContext* const ctx_;  // valid until OnDone
  std::shared_ptr<Call> self_;
  std::mutex mu_;
  grpc::ByteBuffer in_, current_;
  size_t current_size_ = 0;
  std::deque<std::string> out_;
  size_t queued_bytes_ = 0;
  bool started_ = false;  // the server has the call's START
  bool reading_ = false, writing_ = false, half_ = false;
  bool finishing_ = false, finished_ = false;
  int waiting_ = 0;
  grpc::Status status_;
  Metadata trailing_;
};

class Service : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    auto call = std::make_shared<Call>(next_call++, ctx);
    Call::Start(call);
    return call.get();
  }
};

std::shared_ptr<Call> find(uint64_t id) {
  std::lock_guard<std::mutex> lock(calls_mu);
  auto it = calls.find(id);
  return it == calls.end() ? nullptr : it->second;
}

// ---- from Python -------------------------------------------------------------------------------

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

// A FINISH frame's status and trailing metadata; false when it is malformed.
bool parse_finish(const char* p, size_t n, grpc::Status* status, Call::Metadata* trailing) {
  Reader r{p, n};
  auto code = static_cast<grpc::StatusCode>(r.u32());
  std::string details = r.str();
  uint32_t count = r.u32();
  for (uint32_t i = 0; r.ok && i < count; i++) {
    std::string key = r.str();
    std::string value = r.str();
    trailing->emplace_back(std::move(key), std::move(value));
  }
  if (!r.ok || static_cast<uint32_t>(code) > 16) return false;
  *status = grpc::Status(code, details);
  return true;
}

const grpc::Status MALFORMED(grpc::StatusCode::INTERNAL, "a malformed reply from the server");

void handle(uint64_t id, Kind kind, const char* p, size_t n) {
  if (id == 0) {
    if (kind == SHUTDOWN) {
      Reader r{p, n};
      ask_shutdown(r.f64());
    }
    return;
  }
  auto call = find(id);
  if (!call) return;  // over already: Python learns it from the CANCEL sent then
  if (kind == MESSAGE) {
    call->Message(p, n);
  } else if (kind == ACK) {
    call->Ack();
  } else if (kind == FINISH) {
    grpc::Status status;
    Call::Metadata trailing;
    if (!parse_finish(p, n, &status, &trailing)) {
      call->Finish(MALFORMED);
      return;
    }
    call->Finish(std::move(status), std::move(trailing));
  }
}

// A response and the status after it, for the same call (what a unary call's answer is).
void handle_last(uint64_t id, const char* p, size_t n, const char* f, size_t fn) {
  auto call = find(id);
  if (!call) return;
  grpc::Status status;
  Call::Metadata trailing;
  if (!parse_finish(f, fn, &status, &trailing)) {
    call->Finish(MALFORMED);
    return;
  }
  call->WriteLast(p, n, std::move(status), std::move(trailing));
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

// Frames from Python, read as many as the socket holds at a time. A response followed by its
// call's FINISH in the same read goes as one operation (StartWriteAndFinish).
void read_python(int fd) {
  std::vector<char> buf(1 << 16);
  size_t have = 0;
  for (;;) {
    ssize_t got = ::read(fd, buf.data() + have, buf.size() - have);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    have += static_cast<size_t>(got);
    size_t at = 0;
    while (have - at >= 13) {
      Head h = head_at(buf.data() + at);
      size_t total = 4 + static_cast<size_t>(h.size);
      if (have - at < total) break;
      const char* payload = buf.data() + at + 13;
      size_t next = at + total;
      if (h.kind == MESSAGE && have - next >= 13) {
        Head f = head_at(buf.data() + next);
        size_t ftotal = 4 + static_cast<size_t>(f.size);
        if (f.kind == FINISH && f.id == h.id && have - next >= ftotal) {
          handle_last(h.id, payload, h.size - 9, buf.data() + next + 13, f.size - 9);
          at = next + ftotal;
          continue;
        }
      }
      handle(h.id, h.kind, payload, h.size - 9);
      at = next;
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
  std::string listen, socket_path;
  std::vector<std::pair<std::string, int>> args;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--listen") {
      listen = value;
    } else if (flag == "--socket") {
      socket_path = value;
    } else if (flag == "--hold") {
      hold_requests = value == "1";
    } else if (flag == "--arg") {
      auto eq = value.find('=');
      if (eq == std::string::npos) die("--arg: NAME=INT");
      args.emplace_back(value.substr(0, eq), std::atoi(value.c_str() + eq + 1));
    } else {
      die("usage: rnnlm_front_end --listen HOST:PORT --socket PATH [--hold 1] [--arg NAME=INT]...");
    }
  }
  if (listen.empty() || socket_path.empty()) die("--listen and --socket are required");
  int fd = connect_to(socket_path);
  static Writer out(fd);
  writer = &out;

  Service service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  for (const auto& [name, value] : args) builder.AddChannelArgument(name, value);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  FrameBuilder ready(0, READY);
  ready.u32(server ? static_cast<uint32_t>(port) : 0u);
  writer->Send(ready.done());
  if (!server) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // READY 0 on its way
    die("cannot listen on --listen");
  }
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
