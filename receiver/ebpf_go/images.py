"""Program images by their inputs: compiled once (compilechild.run_compiler, at most `parallel`
children at once), then kept in memory for the collector's lifetime and on disk in the image cache
(`bpf_cache_dir`), so that twenty binaries of one Go version and a restarted collector pay for no
compile. Requests for an image being compiled wait for that one compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.errors import KernelError
from collector.telemetry import LOG_NAME

from .bpfcompile import IMAGE_FORMAT, ProgramImage
from .compilechild import BPF_DIR, run_compiler
from .preflight import bcc_version


@dataclass
class CompileResult:
    image: ProgramImage
    seconds: float
    origin: str   # "compiled", "memory" (another binary's compile) or "disk" (the image cache)


class ImageStore:
    """Program images: compiled in child processes (at most `parallel` at once), kept in memory
    for the collector's lifetime and on disk in `cache_dir` ("" or None: no disk cache).

    The key hashes everything the image depends on: the C source and every header next to it and
    in bpf/, the flags minus PIN_DIR (the child pins elsewhere), BCC's version, the kernel release
    and the kernel headers used. Requests for a key being compiled wait for that one compile.
    """

    def __init__(self, cache_dir: str | None = None, parallel: int = 2,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.log = log or logging.getLogger(f"{LOG_NAME}.receiver.ebpf_go.loader")
        self._pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="bpfcompile")
        self._lock = threading.Lock()
        self._memory: dict[str, ProgramImage] = {}
        self._inflight: dict[str, Future[CompileResult]] = {}
        self._bcc_version = bcc_version()
        self._running: set[subprocess.Popen[str]] = set()
        self._closed = False
        self.compiles = 0   # child processes run (for tests and metrics)

    def key(self, source: Path, cflags: list[str], kernel_source: str | None) -> str:
        h = hashlib.sha256()
        h.update(f"image{IMAGE_FORMAT}\0bcc {self._bcc_version}\0kernel {platform.release()}\0"
                 f"headers {kernel_source or ''}\0".encode())
        h.update(b"source\0" + source.read_bytes())
        dirs = {source.parent.resolve(), BPF_DIR.resolve()}
        for f in cflags:
            if f.startswith("-I"):
                dirs.add(Path(f[2:]).resolve())
        for d in sorted(dirs):
            for hdr in sorted(d.glob("*.h")):
                h.update(f"\0{hdr.name}\0".encode() + hdr.read_bytes())
        for f in cflags:
            if not f.startswith("-DPIN_DIR="):
                h.update(b"\0flag " + f.encode())
        return h.hexdigest()[:40]

    def submit(self, source: Path, cflags: list[str], kernel_source: str | None) -> Future[CompileResult]:
        """The image for these inputs, from memory, disk, or a new compile (in the background)."""
        key = self.key(source, cflags, kernel_source)
        with self._lock:
            img = self._memory.get(key)
            if img is not None:
                done: Future[CompileResult] = Future()
                done.set_result(CompileResult(img, 0.0, "memory"))
                return done
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._inflight[key] = self._pool.submit(self._build, key, source, cflags, kernel_source)
            return fut

    def get(self, source: Path, cflags: list[str], kernel_source: str | None) -> CompileResult:
        return self.submit(source, cflags, kernel_source).result()

    def _build(self, key: str, source: Path, cflags: list[str], kernel_source: str | None) -> CompileResult:
        try:
            t0 = time.monotonic()
            img = self._read_disk(key)
            origin = "disk"
            if img is None:
                if self._closed:
                    raise KernelError(f"BPF compile of {source.name} cancelled: shutting down")
                img = run_compiler(source, cflags, kernel_source, self._running)
                origin = "compiled"
                with self._lock:
                    self.compiles += 1
                self._write_disk(key, img)
            with self._lock:
                self._memory[key] = img
            return CompileResult(img, time.monotonic() - t0, origin)
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _trusted_dir(self) -> bool:
        """The cache holds programs loaded into the kernel as root: only a directory that nobody
        else can write is used (created 0700 if missing)."""
        d = self.cache_dir
        if d is None:
            return False
        try:
            st = d.stat()
        except FileNotFoundError:
            return True
        except OSError as e:
            why = str(e)
        else:
            if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                return True
            why = f"owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o} (want ours, not group/world-writable)"
        self.log.warning("BPF image cache disabled: %s: %s", d, why)
        self.cache_dir = None
        return False

    def _read_disk(self, key: str) -> ProgramImage | None:
        if not self._trusted_dir() or self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            with open(path, "rb") as f:
                return ProgramImage.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except Exception as e:  # corrupt, truncated, another format: compile again and overwrite it
            self.log.warning("BPF image cache: ignoring unreadable %s (%s); compiling again", path,
                             str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def _write_disk(self, key: str, img: ProgramImage) -> None:
        if not self._trusted_dir() or self.cache_dir is None:
            return
        path = self.cache_dir / f"{key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "w") as f:
                json.dump(img.to_json(), f)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.log.warning("BPF image cache: cannot write %s: %s", path, e)

    def close(self) -> None:
        """Cancel queued compiles and kill running compiler children."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self._running):
            with contextlib.suppress(OSError):
                proc.kill()
