"""The native part of the package: the plain-row sampler (server/_fastsample.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is
found the install goes on without it and the server samples with its ONNX sampler graph
(`rnnlm serve` logs which one it uses).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "server._fastsample",
            ["server/_fastsample.c"],
            extra_compile_args=["-O3", "-Wno-psabi"],
            optional=True,
        )
    ]
)
