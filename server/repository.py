"""The model repository: which bundles a server serves, each as name and version, and its engines.

`--models` names one of three layouts, told apart by where the manifests are:

    DIR/manifest.json                    a single bundle
    DIR/<any>/manifest.json              a directory of bundles
    DIR/<any>/<any>/manifest.json        NAME/VERSION subdirectories

Models are known by the name and version in their manifests, not by directory names. Names
starting with "." are skipped (the exporter's temporary directories). A request that names no
version gets the newest (`newest_version`: the highest number, the plain `2` over its variant
`2-int8`), and one that names no model gets the default model (`resolve_default_model`: the
flag, the environment, the repository's `repository.json`, or the only model).

At start, a bundle that cannot be loaded is logged, counted and listed in `failures` while the
others serve (`strict`, `--strict-models`: every bundle must load). After it, `reload` (SIGHUP,
`--reload-seconds`) brings the served set in line with the directory: new and changed bundles
are loaded and warmed up before they take requests, removed ones are unloaded, and a bundle that
fails to load is logged and counted while whatever was serving keeps serving. Calls hold the
model version they use (`acquire`/`release`), so a version that a reload removes or replaces
finishes its calls and streams before its engine is closed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from server.bundle import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    Bundle,
    BundleError,
    load_bundle,
    member_path,
    read_manifest,
    read_member,
)
from server.engine import Engine, EngineConfig, EngineError, open_engine
from server.limits import quote
from server.metrics import Metrics
from server.text import TextCodec

log = logging.getLogger(__name__)

REPOSITORY_FILE = "repository.json"  # optional, in the repository root: {"default_model": NAME}
MAX_REPOSITORY_BYTES = 64 * 1024  # far more than {"default_model": NAME} needs


class RepositoryError(Exception):
    """The model repository cannot be served as configured; the message names the path."""


class ModelNotFound(LookupError):
    """A request named a model or version that is not loaded."""


class NoDefaultModel(LookupError):
    """A request named no model and the server has no default model."""


@dataclass(eq=False)
class LoadedModel:
    """One served model version: its bundle, its running engine and its text codec.

    `users` counts the calls holding it; a `retired` model (removed or replaced by a reload)
    takes no new calls and is closed when the last one ends.
    """

    bundle: Bundle
    engine: Engine
    codec: TextCodec
    fingerprint: str = ""
    users: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.bundle.name, self.bundle.version)

    @property
    def provider(self) -> str:
        return self.engine.provider


@dataclass
class ReloadResult:
    """What one reload changed: `name:version` of each loaded and unloaded model, and failures."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


_NUMBERED = re.compile(r"(\d+(?:\.\d+)*)(.*)", re.DOTALL)


def version_key(version: str) -> tuple[int, tuple[int, ...], int, str]:
    """Sort key, oldest first: versions that start with a number by that number (dotted parts
    compare as numbers: 1.10 after 1.9), the plain number before its variants (`2` before
    `2-int8`, which is a variant of 2: after 1 and before 3), then text-only versions by text."""
    match = _NUMBERED.fullmatch(version)
    if match is None:
        return (1, (), 1, version)
    number, suffix = match.groups()
    return (0, tuple(int(part) for part in number.split(".")), 1 if suffix else 0, suffix)


def newest_version(versions: Iterable[str]) -> str:
    """The version a request that names none gets: the highest number, its plain version if
    loaded (`2` over `2-int8`), else its first variant by text; text-only versions only when no
    version starts with a number."""
    ordered = sorted(versions, key=version_key)
    numbered = [v for v in ordered if version_key(v)[0] == 0]
    if not numbered:
        return ordered[-1]
    highest = version_key(numbered[-1])[1]
    return next(v for v in numbered if version_key(v)[1] == highest)


@functools.lru_cache(maxsize=256)
def _newest(versions: tuple[str, ...]) -> str:
    """`newest_version`, worked out once per set of loaded versions, not on every call."""
    return newest_version(versions)


def find_bundles(root: Path) -> list[Path]:
    """The bundle directories under a repository root, in a stable order."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: the model repository does not exist or is not a directory")
    if (root / MANIFEST_FILE).is_file():
        return [root]
    found = []
    for child in _subdirs(root):
        if (child / MANIFEST_FILE).is_file():
            found.append(child)
        else:
            found.extend(g for g in _subdirs(child) if (g / MANIFEST_FILE).is_file())
    if not found:
        raise RepositoryError(
            f"{root}: no model bundle found (looked for {MANIFEST_FILE} in it, its "
            "subdirectories and their subdirectories)"
        )
    return found


def resolve_default_model(root: Path, names: Iterable[str], configured: str = "") -> str:
    """The model for requests that name none; empty when there is none.

    In order: `configured` (--default-model, else RNNLM_DEFAULT_MODEL), the repository's own
    `repository.json` ({"default_model": NAME}), the only model when there is one. A name that
    is not among `names` raises RepositoryError naming where it came from.
    """
    loaded = sorted(set(names))
    if configured:
        chosen, source = configured, f"--default-model {quote(configured)} (RNNLM_DEFAULT_MODEL)"
    elif (declared := read_repository_file(root)) is not None:
        chosen, source = declared, f"{root / REPOSITORY_FILE}: default_model {quote(declared)}"
    elif len(loaded) == 1:
        return loaded[0]
    else:
        log.warning(
            "no default model: requests must name a model (models: %s); set --default-model, "
            "RNNLM_DEFAULT_MODEL or default_model in %s",
            ", ".join(loaded),
            root / REPOSITORY_FILE,
        )
        return ""
    if chosen not in loaded:
        raise RepositoryError(f"{source} is not in {root} (models: {', '.join(loaded)})")
    return chosen


def read_repository_file(root: Path) -> str | None:
    """The default model that `root/repository.json` declares; None when there is no file."""
    path = root / REPOSITORY_FILE
    if not os.path.lexists(path):
        return None
    try:  # read as bundle files are: confined to the root, a regular file, bounded in size
        content = read_member(
            member_path(root, REPOSITORY_FILE, "a link to nothing", kind="repository"),
            MAX_REPOSITORY_BYTES,
            kind="repository",
        )
    except BundleError as e:
        raise RepositoryError(str(e)) from e
    try:
        data = json.loads(content)
    except ValueError as e:
        raise RepositoryError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise RepositoryError(f'{path}: must be a JSON object like {{"default_model": "NAME"}}')
    unknown = sorted(set(data) - {"default_model"})
    if unknown:
        raise RepositoryError(
            f"{path}: unknown key {quote(unknown[0])} (the only key is default_model)"
        )
    name = data.get("default_model")
    if not isinstance(name, str) or not name:
        raise RepositoryError(f"{path}: default_model must be a non-empty model name")
    return name


def _subdirs(directory: Path) -> Iterable[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def fingerprint(bundle_dir: Path) -> str:
    """Changes whenever the bundle does: its manifest's bytes and every file's size and mtime.

    Cheap enough to poll (no graph is read), and a bundle still being copied in changes it
    again when the copy completes, so it is retried then.
    """
    try:  # read as the loader reads it: a FIFO or a link out of the bundle is never opened
        digest = hashlib.sha256(
            read_member(member_path(bundle_dir, MANIFEST_FILE), MAX_MANIFEST_BYTES)
        )
    except BundleError as e:  # loading fails with this error; the stamp changes with it
        digest = hashlib.sha256(str(e).encode())
    for path in sorted(bundle_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _model_label(bundle_dir: Path, root: Path) -> str:
    """The model name for the failure metric: the manifest's name, else the directory's."""
    try:
        name = read_manifest(bundle_dir).get("name")
    except BundleError:
        name = None
    if isinstance(name, str) and name:
        return name
    relative = bundle_dir.relative_to(root).parts if bundle_dir != root else ()
    return relative[0] if relative else bundle_dir.name


class ModelRepository:
    """The loaded model versions, looked up by name and optional version."""

    def __init__(
        self,
        models: list[LoadedModel],
        default_model: str,
        *,
        root: Path | None = None,
        engine_config: EngineConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.default_model = default_model
        self._root = root
        self._engine_config = engine_config if engine_config is not None else EngineConfig()
        self._metrics = metrics
        self._models: list[LoadedModel] = []
        self._by_name: dict[str, dict[str, LoadedModel]] = {}
        self._publish(models)
        self._retired: set[LoadedModel] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._failed: dict[Path, str] = {}  # bundle dir -> fingerprint that failed to load
        # bundle dir -> why it is not served (at start or at the last reload that tried it)
        self.failures: dict[Path, str] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        # Called after a retired model version has closed (the server settles its heap).
        self.on_unloaded: Callable[[], None] | None = None

    @classmethod
    async def load(
        cls,
        root: Path,
        default_model: str,
        engine_config: EngineConfig,
        metrics: Metrics,
        *,
        strict: bool = False,
    ) -> ModelRepository:
        """Validate every bundle, then start (and warm up) one engine per model version.

        A bundle that cannot be loaded or started is logged, counted and listed in `failures`,
        and the others serve; it is an error when none can. With `strict` (`--strict-models`)
        any such failure stops the engines already started and raises. A name and version in
        two bundles, or a default model (`resolve_default_model`) that is not served, is an
        error either way.
        """
        paths = find_bundles(root)
        repository = cls([], default_model, root=root, engine_config=engine_config, metrics=metrics)
        bundles = await repository._open_all(paths, strict)
        if not bundles:
            repository._nothing_served()
        resolve_default_model(root, {b.name for b, _ in bundles}, default_model)  # before warm-up
        loaded: list[LoadedModel] = []
        try:
            for bundle, stamp in bundles:
                try:
                    loaded.append(await repository._start(bundle, stamp))
                except (EngineError, BundleError) as e:
                    repository._start_failure(bundle.path, stamp, e, strict)
            if not loaded:
                repository._nothing_served()
            served = {m.name for m in loaded}
            repository.default_model = resolve_default_model(root, served, default_model)
        except BaseException:
            await asyncio.gather(*(m.engine.close() for m in loaded), return_exceptions=True)
            raise
        repository._publish(loaded)
        return repository

    async def _open_all(self, paths: list[Path], strict: bool) -> list[tuple[Bundle, str]]:
        """Each bundle that validates, with its fingerprint; the others are start failures."""
        bundles: dict[tuple[str, str], tuple[Bundle, str]] = {}
        for path in paths:
            stamp = ""
            try:
                stamp = await asyncio.to_thread(fingerprint, path)
                bundle = await asyncio.to_thread(load_bundle, path)
            except (BundleError, OSError) as e:
                self._start_failure(path, stamp, e, strict)
                continue
            key = (bundle.name, bundle.version)
            if key in bundles:
                raise RepositoryError(
                    f"{path}: model {bundle.name!r} version {bundle.version!r} is also in "
                    f"{bundles[key][0].path}; each name and version may appear once"
                )
            bundles[key] = (bundle, stamp)
        return list(bundles.values())

    def _nothing_served(self) -> None:
        first = next(iter(self.failures.values()), "")
        raise RepositoryError(f"{self._root}: no model could be served; {first}")

    def _start_failure(self, path: Path, stamp: str, error: Exception, strict: bool) -> None:
        """A bundle that cannot be served at start: raise (strict) or log, count and list it."""
        message = f"cannot load {path}: {error}"
        if strict:
            raise RepositoryError(f"{message} (--strict-models: every bundle must load)")
        assert self._metrics is not None and self._root is not None
        log.error("start: %s; serving the other bundles", message)
        self._metrics.model_load_failures.labels(model=_model_label(path, self._root)).inc()
        self._failed[path] = stamp
        self.failures[path] = message
        self._metrics.bundles_failing.set(len(self.failures))

    # -- lookups ----------------------------------------------------------------------------

    def failed_models(self) -> set[str]:
        """The model names of the bundles in `failures` (a directory's name when the manifest
        cannot say)."""
        root = self._root
        return set() if root is None else {_model_label(path, root) for path in self.failures}

    @property
    def models(self) -> list[LoadedModel]:
        """Every loaded version, by name then version."""
        return list(self._models)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model `name` (empty: the default) at `version` (empty: the newest)."""
        if not name:
            if not self.default_model:
                raise NoDefaultModel(
                    "model is required: this server has several models and no default "
                    f"(models: {', '.join(self._by_name)})"
                )
            name = self.default_model
        versions = self._by_name.get(name)
        if versions is None:
            raise ModelNotFound(
                f"model {name!r} is not loaded (models: {', '.join(self._by_name)})"
            )
        if not version:
            return versions[_newest(tuple(versions))]
        if version not in versions:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} (versions: "
                f"{', '.join(sorted(versions, key=version_key))})"
            )
        return versions[version]

    def acquire(self, name: str, version: str = "") -> LoadedModel:
        """`get`, holding the model until `release`: a reload does not close it meanwhile."""
        model = self.get(name, version)
        model.users += 1
        return model

    def release(self, model: LoadedModel) -> None:
        model.users -= 1
        if model.retired and model.users == 0:
            self._close_later(model)

    # -- reload -----------------------------------------------------------------------------

    async def reload(self, *, retry_failed: bool = True) -> ReloadResult:
        """Load new and changed bundles, unload removed ones; failures keep what serves.

        With `retry_failed` false (polling), a bundle that already failed is tried again only
        once it changes, so a broken bundle is reported once and not at every poll.
        """
        if self._root is None or self._metrics is None:
            raise RepositoryError("this repository was not loaded from a directory")
        async with self._lock:
            result = ReloadResult()
            if self._closed:
                return result
            try:
                paths = await asyncio.to_thread(find_bundles, self._root)
                stamps = {p: await asyncio.to_thread(fingerprint, p) for p in paths}
            except (RepositoryError, OSError) as e:
                self._fail(result, "", f"cannot read the model repository: {e}")
                return result
            current = {m.bundle.path: m for m in self._models}
            keep = [m for m in self._models if stamps.get(m.bundle.path) == m.fingerprint]
            started: list[LoadedModel] = []
            try:
                for path, stamp in stamps.items():
                    old = current.get(path)
                    if old is not None and old.fingerprint == stamp:
                        continue
                    if not retry_failed and self._failed.get(path) == stamp:
                        if old is not None:
                            keep.append(old)
                        continue
                    model = await self._try_start(path, stamp, [*keep, *started], old, result)
                    if model is not None:
                        started.append(model)
                    elif old is not None:
                        keep.append(old)  # a changed bundle that fails: the old one serves on
                if not keep and not started:
                    self._fail(result, "", "the reload would leave no model loaded")
                    return result
            except BaseException:
                await asyncio.gather(*(m.engine.close() for m in started), return_exceptions=True)
                raise
            self._failed = {p: s for p, s in self._failed.items() if p in stamps}
            self.failures = {p: m for p, m in self.failures.items() if p in stamps}
            self._metrics.bundles_failing.set(len(self.failures))
            served = set(keep) | set(started)
            gone = [m for m in self._models if m not in served]
            self._publish([*keep, *started])
            for model in started:
                result.loaded.append(f"{model.name}:{model.version}")
            for model in gone:
                result.unloaded.append(f"{model.name}:{model.version}")
                self._retire(model)
        if self.default_model and self.default_model not in self._by_name:
            log.warning(
                "the default model %r is no longer in %s: requests that name no model fail",
                self.default_model,
                self._root,
            )
        if result.loaded or result.unloaded:
            log.info(
                "reloaded %s: loaded %s; unloading %s",
                self._root,
                ", ".join(result.loaded) or "nothing",
                ", ".join(result.unloaded) or "nothing",
            )
        return result

    async def _try_start(
        self,
        path: Path,
        stamp: str,
        others: list[LoadedModel],
        replaces: LoadedModel | None,
        result: ReloadResult,
    ) -> LoadedModel | None:
        """Load and start one bundle for a reload; None (logged, counted) when it fails."""
        assert self._root is not None
        try:
            bundle = await asyncio.to_thread(load_bundle, path)
            for other in others:
                if other.key == (bundle.name, bundle.version):
                    raise RepositoryError(
                        f"{path}: model {bundle.name!r} version {bundle.version!r} is also in "
                        f"{other.bundle.path}; each name and version may appear once"
                    )
            model = await self._start(bundle, stamp)
        except (BundleError, EngineError, RepositoryError, OSError) as e:
            self._failed[path] = stamp
            self.failures[path] = f"cannot load {path}: {e}"
            keeping = f"; {replaces.name}:{replaces.version} keeps serving" if replaces else ""
            self._fail(result, _model_label(path, self._root), f"cannot load {path}: {e}{keeping}")
            return None
        self._failed.pop(path, None)
        self.failures.pop(path, None)
        return model

    def _fail(self, result: ReloadResult, model: str, message: str) -> None:
        assert self._metrics is not None
        log.error("reload: %s", message)
        self._metrics.model_load_failures.labels(model=model).inc()
        result.failed.append(message)

    # -- engines ----------------------------------------------------------------------------

    async def _start(self, bundle: Bundle, stamp: str) -> LoadedModel:
        assert self._metrics is not None
        name, version = bundle.name, bundle.version
        engine = open_engine(
            bundle, self._engine_config, self._metrics.engine_metrics(name, version)
        )
        try:
            await engine.start()
        except BaseException:
            await engine.close()
            raise
        finally:
            bundle.graph_bytes.release()  # the sessions hold their own copies of the weights
        self._metrics.set_model_info(name, version, engine.provider, bundle.cell)
        log.info(
            "loaded model %s version %s from %s: %s, %s tokenizer, vocabulary %d, provider %s",
            name,
            version,
            bundle.path,
            bundle.cell,
            bundle.tokenizer_kind,
            bundle.vocab_size,
            engine.provider,
        )
        for graph, path in (("score", bundle.score_graph), ("prefill", bundle.prefill_graph)):
            if path is None:
                log.info("%s version %s has no %s graph: its %s work runs on the step graph",
                         name, version, graph, graph)  # fmt: skip
        if bundle.batch_independent is not True:
            # Chosen at export (--per-tensor-activations): said; an older export: warned.
            log.log(
                logging.INFO if bundle.batch_independent is False else logging.WARNING,
                "%s version %s is int8 with one activation scale a run: its results move with "
                "what shares a batch (a seeded generation can differ under load); `rnnlm "
                "int8-rows` rewrites it (docs/bundle.md)",
                name,
                version,
            )
        return LoadedModel(bundle, engine, TextCodec(bundle), stamp)

    def _publish(self, models: list[LoadedModel]) -> None:
        """Make `models` the served set (one assignment each: lookups never see a mix)."""
        ordered = sorted(models, key=lambda m: (m.name, version_key(m.version)))
        by_name: dict[str, dict[str, LoadedModel]] = {}
        for m in ordered:
            by_name.setdefault(m.name, {})[m.version] = m
        self._models, self._by_name = ordered, by_name

    def _retire(self, model: LoadedModel) -> None:
        model.retired = True
        self._retired.add(model)
        if model.users == 0:
            self._close_later(model)

    def _close_later(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._close_retired(model))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_retired(self, model: LoadedModel) -> None:
        self._retired.discard(model)
        await model.engine.close()
        labels = (model.name, model.version, model.provider, model.bundle.cell)
        successor = next((m for m in self._models if m.key == model.key), None)
        if self._metrics is not None:
            if successor is None:
                self._metrics.remove_model_info(*labels)
            elif (successor.provider, successor.bundle.cell) != labels[2:]:
                self._metrics.model_info.remove(*labels)
        log.info("unloaded model %s version %s (%s)", model.name, model.version, model.bundle.path)
        if self.on_unloaded is not None:
            self.on_unloaded()

    async def close(self) -> None:
        """Stop every engine, served or retired (each finishes or cancels its work)."""
        async with self._lock:
            self._closed = True
            engines = [m.engine for m in (*self._models, *self._retired)]
            await asyncio.gather(*(e.close() for e in engines), *list(self._closing))
