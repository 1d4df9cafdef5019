// The transport floor without Python: gRPC's C++ callback API answering every message of a
// call on `/rnnlm.bench.Echo/*` with the same bytes (a unary call, or every message of a
// bidirectional stream until the client half-closes). Beside `python -m benchmarks.echo`, its
// CPU a call is what a gRPC front end that is not Python would cost (docs/performance.md,
// "Where the targets stand"). Not built by the project: it needs Debian's libgrpc++-dev.
//
//     g++ -O2 benchmarks/echo_cpp/echo.cc $(pkg-config --cflags --libs grpc++) -o /tmp/echo_cpp
//     /tmp/echo_cpp    # prints "echo listening on 127.0.0.1:PORT"
#include <cstdio>
#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/async_generic_service.h>

class Reactor : public grpc::ServerGenericBidiReactor {
 public:
  Reactor() { StartRead(&buf_); }
  // Every message back, until the client half-closes: a unary call or a bidirectional stream.
  void OnReadDone(bool ok) override {
    if (!ok) { Finish(grpc::Status::OK); return; }
    StartWrite(&buf_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) { Finish(grpc::Status::OK); return; }
    StartRead(&buf_);
  }
  void OnDone() override { delete this; }
 private:
  grpc::ByteBuffer buf_;
};

class Service : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Reactor();
  }
};

int main() {
  Service service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&service);
  auto server = builder.BuildAndStart();
  std::fprintf(stderr, "echo listening on 127.0.0.1:%d\n", port);
  server->Wait();
}
