"""The streaming pipeline: images decoded and preprocessed in ``DataLoader`` worker processes, the model on
the main process, output files encoded and written by a bounded pool of threads, records in input order.

Memory is flat in the number of images: at most ``2 * workers`` batches wait decoded, and at most two
batches' results wait to be written.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import math
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from camframe.core.errors import SMALLER, CamframeError, out_of_memory
from camframe.engine.explainer import Explainer, Prepared, Result
from camframe.core.images import _max_pixels, load_image
from camframe.core.profile import Profile
from camframe.output.folder import _listed

__all__ = ["default_workers", "default_batch_size", "default_threads", "Loaded", "batches", "images", "Writer",
           "explain_stream", "record_files"]

Prepare = Callable[[Sequence[np.ndarray]], "tuple[Tensor | list[Tensor], list[dict]]"]
Write = Callable[[Result, int, Path, np.ndarray], dict]


def default_workers(device: torch.device | str | None = None) -> int:
    """Decoding processes when not told: a core is left to the model, at most 4; none for a model on
    the CPU of a machine with 2 cores or fewer, where a decoding process only takes time from the
    model's threads (decoding is a few percent of explaining there; docs/benchmarks.md measures it)."""
    cores = os.cpu_count() or 1
    if cores <= 2 and torch.device(device or "cpu").type == "cpu":
        return 0
    return max(1, min(4, cores - 1))


def default_batch_size(ex: Explainer) -> int:
    """Images per forward pass when not told: the adapter's ``cpu_batch_size`` on the CPU, else 8."""
    return ex.adapter.cpu_batch_size if ex.device.type == "cpu" else 8


def default_threads() -> int:
    """Threads writing output files when not told: half the cores, at least 2, at most 8."""
    return max(2, min(8, (os.cpu_count() or 1) // 2))


@dataclass
class Loaded:
    """One batch as a worker hands it over: paths, decoded RGB originals, and (when a ``prepare``
    was given) the model's input ``x`` and per-image ``metas``."""

    paths: list[Path]
    images: list[np.ndarray]
    x: Tensor | list[Tensor] | None = None  # a list: per-image inputs of different sizes
    metas: list[dict] = field(default_factory=list)

    def pin_memory(self) -> "Loaded":
        """Only the model's input is pinned (the ``DataLoader`` calls this when pinning)."""
        if isinstance(self.x, Tensor):
            self.x = self.x.pin_memory()
        elif self.x is not None:
            self.x = [t.pin_memory() for t in self.x]
        return self


@dataclass
class _Failed:
    message: str


class _Batches(Dataset):
    """Item ``i``: batch ``i`` of ``paths`` decoded (and prepared); a ``CamframeError`` comes back as
    ``_Failed``, so the main process raises it as the same one line."""

    def __init__(self, paths: Sequence[Path], size: int, prepare: Prepare | None, max_pixels: int) -> None:
        self.paths, self.size, self.prepare, self.max_pixels = list(paths), size, prepare, max_pixels

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.size)

    def __getitem__(self, i: int) -> Loaded | _Failed:
        paths = self.paths[i * self.size:(i + 1) * self.size]
        try:
            decoded = [load_image(p, self.max_pixels) for p in paths]
            if self.prepare is None:
                return Loaded(paths, decoded)
            x, metas = self.prepare(decoded)
        except CamframeError as exc:
            return _Failed(str(exc))
        except Exception as exc:
            why = out_of_memory(exc)
            if why is None:
                raise
            names = ", ".join(map(str, paths))
            return _Failed(f"{names}: out of memory decoding or making the model's input ({why}); {SMALLER}")
        return Loaded(paths, decoded, x, list(metas))


def _same(item: Any) -> Any:
    return item


_STOPS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(_: int) -> None:
    """A worker dies with the process that started it, and leaves its process group: Ctrl-C or a SIGTERM
    to the group reach the main process alone, which reports them and shuts its workers down."""
    cv2.setNumThreads(1)  # OpenCV's own thread pool does not survive fork; one process is one core here
    _die_with_parent(os.getppid())
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler: the main process reports
    sys.excepthook = _quiet_hangups  # what multiprocessing's fd-passing thread reports its errors through
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by ``batches`` from before the fork


def _quiet_hangups(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """No traceback in a worker when the main process hangs up while it takes a batch (interrupted; it
    reports that itself): the tensors' file descriptors are handed over by a thread of the worker."""
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, exc, tb)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` ends: Linux's ``PR_SET_PDEATHSIG``, elsewhere a thread that
    polls the parent's pid (a worker that outlived a killed run would hold its files and CPU)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="camframe-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def batches(paths: Sequence[Path], size: int, prepare: Prepare | None = None, workers: int = 0,
            pin: bool = False) -> Iterator[Loaded]:
    """``paths`` decoded (and ``prepare``d), ``size`` at a time, in order; the work runs in ``workers``
    processes (0: in this one), each at most 2 batches ahead. A decoding error is a ``CamframeError``."""
    if workers < 0:
        raise CamframeError(f"workers must be 0 or more, got {workers}")
    dataset = _Batches(paths, size, prepare, _max_pixels.get())
    # fork where there is one: nothing is pickled (the bound model included), and workers start at once
    context = "fork" if workers and sys.platform.startswith("linux") else None
    if workers and context is None:
        _picklable(prepare)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_same, pin_memory=pin,
                        prefetch_factor=2 if workers else None, worker_init_fn=_worker_init if workers else None,
                        multiprocessing_context=context)
    with _blocked(_STOPS if workers else set()), _single_threaded_opencv(workers > 0 and context == "fork"):
        items = iter(loader)  # the workers fork here; until each has left the group (``_worker_init``)
    for item in items:
        if isinstance(item, _Failed):
            raise CamframeError(item.message)
        yield item


@contextlib.contextmanager
def _blocked(signals: set[signal.Signals]) -> Iterator[None]:
    """Hold ``signals`` in this thread for the block (processes forked in it start with them blocked);
    those that came are delivered after."""
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _single_threaded_opencv(forking: bool) -> Iterator[None]:
    """OpenCV's thread pool wound down in this process while workers fork (then as before): a child that
    inherits the pool's idle threads blocked on their condition variable hangs in ``cv2.setNumThreads``."""
    threads = cv2.getNumThreads()
    if forking:
        cv2.setNumThreads(1)
    try:
        yield
    finally:
        if forking:
            cv2.setNumThreads(threads)


def _picklable(prepare: Prepare | None) -> None:
    """Where workers are spawned, ``prepare`` is pickled to them: say so in one line if it cannot be."""
    try:
        pickle.dumps(prepare)
    except Exception as exc:
        why = (str(exc) or type(exc).__name__).splitlines()[0]
        raise CamframeError(f"the adapter's preprocessor cannot be sent to worker processes here ({why}); "
                            "use --workers 0") from None


def images(paths: Sequence[Path], workers: int = 0) -> Iterator[tuple[Path, np.ndarray]]:
    """Each of ``paths`` with its decoded RGB array, in order, decoded ahead by ``workers`` processes."""
    for batch in batches(paths, 1, None, workers):
        yield batch.paths[0], batch.images[0]


class Writer:
    """Runs ``fn(*args)`` calls on ``threads`` threads and hands their results back in the order
    submitted; at most ``pending`` calls wait or run at a time (0 threads: each call runs at once)."""

    def __init__(self, threads: int, pending: int) -> None:
        self._torch_threads = torch.get_num_threads()
        # each writer's torch ops on one thread: teams of their own would compete with the model's
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="camframe-write",
                                         initializer=torch.set_num_threads, initargs=(1,)) if threads > 0 else None)
        self._queue: collections.deque[Future] = collections.deque()
        self._pending = max(1, pending)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
        """Queue ``fn(*args)``; yields the oldest results while more than ``pending`` are queued."""
        if self._pool is None:
            yield fn(*args)
            return
        self._queue.append(self._pool.submit(fn, *args))
        while len(self._queue) > self._pending:
            yield self._queue.popleft().result()

    def drain(self) -> Iterator[Any]:
        """The remaining results, in order."""
        while self._queue:
            yield self._queue.popleft().result()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        """Cancel what has not started and wait for what has (no file is written after this)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self._torch_threads)  # what threads made later start with, as before
        self._queue.clear()


def explain_stream(ex: Explainer, paths: Sequence[Path], write: Write, *, target: Any = None, boxes: Any = None,
                   batch_size: int | None = None, workers: int | None = None, threads: int | None = None,
                   request: Callable[[list[Path], list[np.ndarray]], dict[str, Any]] | None = None) -> Iterator[dict]:
    """Explain ``paths``, ``batch_size`` images per forward pass (default ``default_batch_size(ex)``), and
    yield each image's record in input order once its files are written: what ``write(result, index, path,
    image)`` returns (in
    ``camframe explain``, the manifest entry; ``record_files`` lists its files). ``write`` runs on
    ``threads`` threads (default ``default_threads()``; 0: in this thread), so it must be thread-safe.

    Decoding and the adapter's ``preprocessor`` run in ``workers`` processes (default
    ``default_workers(ex.device)``; 0: here); on CUDA their batches come in pinned memory. Outputs do not depend
    on ``workers`` or ``threads``. ``request``, given a batch's paths and images, gives further keyword
    arguments of the explainer's call (``labels``, ``regions``...: ``camframe.output.outcomes.Request``).
    """
    workers = default_workers(ex.device) if workers is None else workers
    batch_size = default_batch_size(ex) if batch_size is None else batch_size
    threads = default_threads() if threads is None else threads
    prepare = ex.adapter.preprocessor(ex.model)
    loaded = batches(paths, batch_size, prepare, workers, pin=ex.device.type == "cuda")
    with ex, Writer(threads, 2 * batch_size) as writer:
        for batch in _timed(loaded, ex.profile, "reading images"):
            assert batch.x is not None
            more = request(batch.paths, batch.images) if request is not None else {}
            result = ex(Prepared(batch.x, batch.metas, batch.images), target=target, boxes=boxes, **more)
            for i, (path, image) in enumerate(zip(batch.paths, batch.images)):
                yield from _timed(writer.submit(write, result, i, path, image), ex.profile, "writing files")
            del result, batch
        yield from _timed(writer.drain(), ex.profile, "writing files")


def _timed(items: Iterator[Any], profile: Profile, stage: str) -> Iterator[Any]:
    """``items``, the time taken to make each (not what the consumer does with it) timed as ``stage``."""
    end = object()
    while True:
        with profile.stage(stage):
            item = next(items, end)
        if item is end:
            return
        yield item


def record_files(record: dict) -> list[str]:
    """The output files an image's record (a manifest entry) lists."""
    return [name for name in _listed([record]) if name]
