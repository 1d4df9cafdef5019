"""The native part of the package: the plain-row sampler (server/_fastsample.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is
found the install goes on without it and the server samples with its ONNX sampler graph
(`rnnlm serve` logs which one it uses).

On x86-64 the kernel is built three times: for the baseline (`server._fastsample`, which
runs anywhere), for x86-64-v3 (AVX2) and for x86-64-v4 (AVX-512), each with its vectors as
wide as its target's registers. A wheel built on one machine then runs at full speed on
another: server/fastsample.py asks the baseline build which level the CPU runs and loads
the best build it has. A compiler too old for a level's flag skips that build.
"""

import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86_64 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def kernel(name: str, source: str, march: str | None = None) -> Extension:
    flags = ["-O3", "-Wno-psabi"] + ([f"-march={march}"] if march else [])
    # `depends`: the level builds' sources only include server/_fastsample.c, so a change to it
    # must rebuild them too.
    return Extension(
        f"server.{name}",
        [source],
        depends=["server/_fastsample.c"],
        extra_compile_args=flags,
        optional=True,
    )


extensions = [kernel("_fastsample", "server/_fastsample.c")]
if X86_64:
    extensions += [
        kernel("_fastsample_v3", "server/_fastsample_v3.c", "x86-64-v3"),
        kernel("_fastsample_v4", "server/_fastsample_v4.c", "x86-64-v4"),
    ]


class BuildWithFrontEnd(build_ext):
    """The extensions, then the native gRPC front end (server/front_end.cc) where grpc++ is found
    by pkg-config (Debian: libgrpc++-dev and pkg-config). Optional like the kernels: without
    it, `rnnlm serve --front-end auto` serves with grpc.aio."""

    def run(self) -> None:
        super().run()
        target_dir = "server" if self.inplace else os.path.join(self.build_lib, "server")
        target = os.path.join(target_dir, "rnnlm_front_end")
        source = "server/front_end.cc"
        if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source):
            return  # built already
        if not shutil.which("pkg-config"):
            print("rnnlm: no pkg-config; the native gRPC front end is not built")
            return
        flags = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True
        )
        if flags.returncode != 0:
            print("rnnlm: grpc++ not found by pkg-config; the native gRPC front end is not built")
            return
        os.makedirs(target_dir, exist_ok=True)
        command = ["g++", "-O2", "-std=c++17", source, "-o", target]
        built = subprocess.run(command + flags.stdout.split(), capture_output=True, text=True)
        if built.returncode != 0:
            print(f"rnnlm: the native gRPC front end did not build:\n{built.stderr[-2000:]}")


setup(ext_modules=extensions, cmdclass={"build_ext": BuildWithFrontEnd})
