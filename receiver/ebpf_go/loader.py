"""BPF programs for the receiver: checks that they can run here, kernel headers, compiling one
program per binary (in a child process, bpfcompile.py), the image cache, loading and attaching
(bpfsys.py), without BCC or LLVM in the collector process.

`import_bcc` and `release_bpf` remain for tests and benchmarks that build their own BCC objects.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.errors import KernelError, PrivilegeError
from collector.telemetry import LOG_NAME

from . import bpfsys, hostfs
from .bpfcompile import IMAGE_FORMAT, MapImage, ProgramImage, remove_pin_dir
from .ringbuf import RingBuffer

BPF_DIR = Path(__file__).resolve().parent / "bpf"   # the headers every program includes (-I)
COMPILER_LOG = logging.getLogger(f"{LOG_NAME}.receiver.ebpf_go.compiler")
STUB_HEADERS = Path("/tmp/otelgo-collector-kheaders")

# Capability bits (linux/capability.h) a BPF tracer needs.
CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 2, 19, 21, 38, 39


def import_bcc() -> Any:
    """The bcc module, or KernelError saying how to install it."""
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as e:
        raise KernelError(
            f"BCC is not importable ({e}): install it with `apt-get install python3-bpfcc` and make it "
            "visible to this Python (`bash tools/setup.sh` links /usr/lib/python3/dist-packages/bcc into .venv)"
        ) from None
    return bcc


def missing_capabilities() -> list[str]:
    """The capabilities this process lacks to trace others: loading BPF and opening uprobe perf
    events (CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON), and reading other users' /proc/<pid>/exe and
    memory (CAP_SYS_PTRACE). Empty when it may trace."""
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    has = lambda bit: bool(cap_eff >> bit & 1)  # noqa: E731
    missing = []
    if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
        missing += [n for n, b in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON)) if not has(b)]
    if not has(CAP_SYS_PTRACE):
        missing.append("CAP_SYS_PTRACE")
    return missing


PRIVILEGE_FIX = ("run as root, or grant `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+ep` "
                 "(in a container: --privileged --pid=host)")


def check_privileges() -> None:
    """PrivilegeError unless we may load BPF programs, open uprobe perf events and read other processes."""
    missing = missing_capabilities()
    if missing:
        raise PrivilegeError(
            f"the ebpf_go receiver needs root (uid is {os.getuid()}) or the capabilities CAP_BPF, CAP_PERFMON "
            f"and CAP_SYS_PTRACE; missing: {', '.join(missing)}: {PRIVILEGE_FIX}")


def _usable_tree(path: Path) -> bool:
    return (path / "include" / "linux" / "kconfig.h").exists()


def find_kernel_headers(setting: str) -> tuple[str | None, str]:
    """(BCC_KERNEL_SOURCE to set or None for BCC's default, description). KernelError if none.

    `auto`: /lib/modules/$(uname -r)/build (BCC's own default), then /usr/src/linux-headers-*, then a
    stub tree built from the UAPI headers of linux-libc-dev (enough for uprobe-only programs, which
    read no kernel structs; see docs reference ebpf-on-this-platform §8.3).
    """
    if setting != "auto":
        p = Path(setting)
        if _usable_tree(p):
            return str(p), f"kernel headers from {p}"
        raise KernelError(f"kernel_headers: {p} is not a kernel header tree (no include/linux/kconfig.h)")
    tried = []
    build = Path(f"/lib/modules/{platform.release()}/build")
    tried.append(str(build))
    # Debian splits a header package in <ver>-amd64 (build tree) and <ver>-common (sources); BCC
    # reads /lib/modules/.../build and .../source together.
    if build.is_dir() and (_usable_tree(build) or _usable_tree(build.parent / "source")):
        return None, f"kernel headers from {build.resolve()}"
    for cand in sorted(glob.glob("/usr/src/linux-headers-*"), reverse=True):
        tried.append(cand)
        if _usable_tree(Path(cand)) and (Path(cand) / "include" / "generated" / "autoconf.h").exists():
            return cand, f"kernel headers from {cand}"
    tried.append("a stub tree from /usr/include (linux-libc-dev)")
    try:
        return str(build_stub_headers()), f"stub kernel headers built from linux-libc-dev in {STUB_HEADERS}"
    except OSError as e:
        raise KernelError(
            f"no usable kernel headers: tried {', '.join(tried)} ({e}); install linux-headers-amd64 or "
            "linux-libc-dev, or set kernel_headers to a header tree") from None


def build_stub_headers(dest: Path = STUB_HEADERS) -> Path:
    """A minimal header tree for BCC from the UAPI headers in /usr/include (reference §8.3)."""
    if (dest / ".complete").exists():
        return dest
    src_linux, src_generic = Path("/usr/include/linux"), Path("/usr/include/asm-generic")
    src_asm = Path("/usr/include/x86_64-linux-gnu/asm")
    for p in (src_linux, src_generic, src_asm):
        if not p.is_dir():
            raise OSError(f"{p} missing")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_linux, tmp / "include/uapi/linux")
    shutil.copytree(src_generic, tmp / "include/uapi/asm-generic")
    shutil.copytree(src_asm, tmp / "arch/x86/include/uapi/asm")
    (tmp / "include/uapi/linux/bpf.h").write_text("/* BCC brings its own bpf.h */\n")
    (tmp / "include/linux").mkdir(parents=True)
    (tmp / "include/linux/kconfig.h").write_text("#define CONFIG_BPF_SYSCALL 1\n#define CONFIG_X86_64 1\n")
    rel = platform.release().split("-")[0].split(".")
    major, minor, patch = (int(x) if x.isdigit() else 0 for x in (rel + ["0", "0"])[:3])
    (tmp / "include/linux/version.h").write_text(
        f"#define LINUX_VERSION_CODE {(major << 16) + (minor << 8) + min(patch, 255)}\n"
        "#define KERNEL_VERSION(a,b,c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n")
    (tmp / "include/linux/log2.h").write_text("\n")
    (tmp / "arch/x86/include/asm").mkdir(parents=True)
    (tmp / "arch/x86/include/asm/page.h").write_text("#define PAGE_SIZE 4096\n")
    (tmp / "include/linux/types.h").write_text(
        "#ifndef _OTELGO_STUB_TYPES_H\n#define _OTELGO_STUB_TYPES_H\n#include <uapi/linux/types.h>\n"
        "typedef __u8 u8; typedef __u16 u16; typedef __u32 u32; typedef __u64 u64;\n"
        "typedef __s8 s8; typedef __s16 s16; typedef __s32 s32; typedef __s64 s64;\n"
        "typedef _Bool bool; typedef unsigned long size_t; typedef long ssize_t;\n"
        "typedef unsigned long uintptr_t;\n#endif\n")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def check_bcc() -> None:
    """KernelError unless BCC is importable by the compiler child (checked without importing it:
    the collector process never loads BCC or LLVM)."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as e:
        spec, why = None, str(e)
    else:
        why = "No module named 'bcc'"
    if spec is None:
        raise KernelError(
            f"BCC is not importable ({why}): install it with `apt-get install python3-bpfcc` and make it "
            "visible to this Python (`bash tools/setup.sh` links /usr/lib/python3/dist-packages/bcc into .venv)")


def bcc_version() -> str:
    """BCC's version, read from its package files (not imported)."""
    try:
        spec = importlib.util.find_spec("bcc")
        if spec is not None and spec.origin:
            text = (Path(spec.origin).parent / "version.py").read_text()
            return text.split("=", 1)[1].strip().strip("'\"") if "=" in text else text.strip()
    except (ImportError, ValueError, OSError):
        pass
    return "unknown"


# ---------------------------------------------------------------- compiled images


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


COMPILER_MODULE = "receiver.ebpf_go.bpfcompile"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the directory holding `receiver`
COMPILE_TIMEOUT_S = 300.0
COMPILE_PIN_PARENT = "/sys/fs/bpf"


def run_compiler(source: Path, cflags: list[str], kernel_source: str | None,
                 running: set[subprocess.Popen[str]] | None = None) -> ProgramImage:
    """Compile in a child process (bpfcompile.py). KernelError with the compiler's one line on
    failure, a crash of BCC included: the collector itself never runs BCC. The child is in
    `running` while it runs (so that a shutdown can kill it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        # The child pins into a directory we remove whatever happens to it (a crash included), on
        # bpffs: mounted here if nothing is (the first pin of a run may be this one).
        hostfs.ensure_bpffs(COMPILE_PIN_PARENT)
        pin_dir = tempfile.mkdtemp(prefix="otelgo-compile-", dir=COMPILE_PIN_PARENT)
    except OSError as e:
        raise KernelError(f"BPF compile of {source.name} failed: cannot make a pin directory in "
                          f"{COMPILE_PIN_PARENT} (bpffs): {e}") from None
    # A probe's own headers sit beside its C (the key above hashes that directory too).
    req = {"source": str(source), "cflags": [f"-I{BPF_DIR}", f"-I{source.parent}", *cflags],
           "kernel_source": kernel_source,
           "pin_dir": pin_dir}
    try:
        try:
            proc = subprocess.Popen([sys.executable, "-m", COMPILER_MODULE], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as e:
            raise KernelError(f"BPF compile of {source.name} failed: cannot run the compiler: {e}") from None
        if running is not None:
            running.add(proc)
        try:
            stdout, stderr = proc.communicate(json.dumps(req), timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise KernelError(f"BPF compile of {source.name} failed: no answer from the compiler in "
                              f"{COMPILE_TIMEOUT_S:.0f}s") from None
        finally:
            if running is not None:
                running.discard(proc)
    finally:
        remove_pin_dir(pin_dir)
    return _answer(source, proc.returncode, stdout, stderr)


def _answer(source: Path, returncode: int, stdout: str, stderr: str) -> ProgramImage:
    proc = subprocess.CompletedProcess([], returncode, stdout, stderr)
    answer: dict[str, Any] = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            answer = json.loads(line)
            break
        except ValueError:
            continue
    if "image" in answer and proc.returncode == 0:
        said = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        if said:   # clang's warnings are ours to read, not the operator's: one debug line, in the log tree
            COMPILER_LOG.debug("BPF compile of %s: the compiler said %d line(s), first: %s", source.name,
                               len(said), said[0])
        return ProgramImage.from_json(answer["image"])
    if answer.get("kind") == "import":
        check_bcc()  # the same message as the start-up check, if it fails here too
        raise KernelError(f"{answer['error']}: install it with `apt-get install python3-bpfcc`")
    errors = [ln.strip() for ln in proc.stderr.splitlines() if "error:" in ln]
    if errors:
        why = errors[0] + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
    elif proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = f"the BCC compiler crashed ({sig})" + (f": {last[-1]}" if last else "")
    else:
        why = str(answer.get("error") or (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
    raise KernelError(f"BPF compile of {source.name} failed: {why}")


# ---------------------------------------------------------------- loaded programs


class BpfMap:
    """One map of a loaded program: raw bytes in and out. `Key`/`Leaf` may be set to ctypes
    types by whoever knows the C structs (then `tab[Key()] = Leaf()` works, as with BCC)."""

    def __init__(self, name: str, fd: int, spec: MapImage) -> None:
        self.name, self.fd, self.spec = name, fd, spec
        self.Key: Any = None
        self.Leaf: Any = None
        self._vsize = spec.value_size
        if spec.type in bpfsys.PERCPU_MAPS:
            self._vsize = ((spec.value_size + 7) & ~7) * bpfsys.possible_cpus()

    def lookup(self, key: bytes) -> bytes | None:
        return bpfsys.map_lookup(self.fd, key, self._vsize)

    def update(self, key: bytes, value: bytes, flags: int = bpfsys.BPF_ANY) -> None:
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key: bytes) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def keys(self) -> Iterator[bytes]:
        k: bytes | None = None
        while True:
            k = bpfsys.map_next_key(self.fd, k, self.spec.key_size)
            if k is None:
                return
            yield k

    def read_u64(self, index: int) -> int:
        """Entry `index` of an array of u64 (per-CPU values summed)."""
        raw = self.lookup(index.to_bytes(4, "little"))
        if raw is None:
            return 0
        step = (self.spec.value_size + 7) & ~7
        return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), step))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(bytes(key), bytes(value))

    def __getitem__(self, key: Any) -> bytes:
        v = self.lookup(bytes(key))
        if v is None:
            raise KeyError(key)
        return v

    def __delitem__(self, key: Any) -> None:
        if not self.delete(bytes(key)):
            raise KeyError(key)


class LoadedProgram:
    """A program image loaded into the kernel: its maps (pinned ones under `pin_dir`), its
    functions (verified on first use) and its uprobes. Offers what the probe modules called on a
    BCC object: `attach_uprobe(name=, addr=, fn_name=, pid=)`, `uprobe_fds`."""

    def __init__(self, image: ProgramImage, pin_dir: str | None) -> None:
        self.image = image
        self.maps: dict[str, BpfMap] = {}
        self.prog_fds: dict[str, int] = {}
        self.uprobe_fds: dict[tuple[str, int, int, str], int] = {}
        self._ringbufs: dict[str, RingBuffer] = {}
        try:
            for m in image.maps:
                self.maps[m.name] = BpfMap(m.name, self._open_map(m, pin_dir), m)
        except BaseException:
            self.close()
            raise

    def _open_map(self, m: MapImage, pin_dir: str | None) -> int:
        spec = bpfsys.MapSpec(m.name, m.type, m.key_size, m.value_size, m.max_entries, m.flags)
        if m.pin is None:
            return bpfsys.map_create(spec)
        if not pin_dir:
            raise KernelError(f"{self.image.source}: map {m.name} is pinned but no pin directory is set")
        path = os.path.join(pin_dir, m.pin)
        for _ in range(2):
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BpfError as e:
                if e.errno != errno.ENOENT:
                    raise
            else:
                got = bpfsys.map_info(fd)
                if (got.type, got.key_size, got.value_size) != (m.type, m.key_size, m.value_size):
                    os.close(fd)
                    raise KernelError(f"{path} is pinned with another layout (type {got.type}, key {got.key_size} "
                                      f"B, value {got.value_size} B) than {self.image.source} expects")
                return fd
            fd = bpfsys.map_create(spec)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                bpfsys.obj_pin(fd, path)
                return fd
            except bpfsys.BpfError as e:
                os.close(fd)
                if e.errno != errno.EEXIST:   # else pinned meanwhile by another program: use that one
                    raise
        raise KernelError(f"cannot open or pin {path}")

    def __getitem__(self, name: str | bytes) -> BpfMap:
        return self.maps[name.decode() if isinstance(name, bytes) else name]

    def load_func(self, name: str | bytes, prog_type: int = bpfsys.PROG_KPROBE) -> int:
        """The fd of function `name`, loaded (and verified) on first use."""
        fn = name.decode() if isinstance(name, bytes) else name
        fd = self.prog_fds.get(fn)
        if fd is not None:
            return fd
        code = self.image.functions.get(fn)
        if code is None:
            raise KernelError(f"{self.image.source}: no BPF function {fn}")
        insns = bytearray(code)
        for idx, map_name in self.image.relocations.get(fn, ()):
            bpfsys.patch_imm(insns, idx, self.maps[map_name].fd)
        try:
            fd = bpfsys.prog_load(prog_type, bytes(insns), self.image.license, fn)
        except bpfsys.BpfError as e:
            raise KernelError(f"{self.image.source}: {e.strerror} {e.what}") from None
        self.prog_fds[fn] = fd
        return fd

    def attach_uprobe(self, name: str | bytes, addr: int, fn_name: str | bytes, pid: int = -1,
                      sym_off: int = 0) -> int:
        """Attach `fn_name` at the ELF virtual address `addr` (+ sym_off) of file `name`."""
        path = name.decode() if isinstance(name, bytes) else name
        fn = fn_name.decode() if isinstance(fn_name, bytes) else fn_name
        prog_fd = self.load_func(fn)
        offset = bpfsys.vaddr_to_offset(path, addr + sym_off)
        key = (path, offset, pid, fn)
        if key in self.uprobe_fds:
            raise KernelError(f"uprobe {fn} at {path}:{offset:#x} is already attached for pid {pid}")
        self.uprobe_fds[key] = bpfsys.attach_uprobe(prog_fd, path, offset, pid)
        return self.uprobe_fds[key]

    def detach(self, key: tuple[str, int, int, str]) -> None:
        fd = self.uprobe_fds.pop(key, None)
        if fd is not None:
            os.close(fd)   # closing the perf event detaches the uprobe

    def ring_buffer(self, name: str) -> RingBuffer:
        rb = self._ringbufs.get(name)
        if rb is None:
            m = self.maps[name]
            if m.spec.type != bpfsys.MAP_RINGBUF:
                raise KernelError(f"{self.image.source}: map {name} is not a ring buffer")
            rb = self._ringbufs[name] = RingBuffer(m.fd, m.spec.max_entries)
        return rb

    def close(self) -> None:
        for key in list(self.uprobe_fds):
            self.detach(key)
        for rb in self._ringbufs.values():
            rb.close()
        self._ringbufs.clear()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        for m in self.maps.values():
            os.close(m.fd)
        self.maps.clear()


@dataclass
class Program:
    """One compiled BPF program (one probe module, one binary) and its perf-event links."""

    bpf: LoadedProgram
    source: str
    compile_seconds: float
    origin: str = "compiled"
    # pid -> uprobe keys attached for that pid
    links: dict[int, list[Any]] = field(default_factory=dict)

    def link_count(self) -> int:
        return sum(len(v) for v in self.links.values())


def load_program(result: CompileResult, pin_dir: str | None) -> Program:
    """Create the maps of an image (opening or pinning the pinned ones under `pin_dir`)."""
    try:
        loaded = LoadedProgram(result.image, pin_dir)
    except bpfsys.BpfError as e:
        raise KernelError(f"loading {result.image.source} failed: {e.strerror}: {e.what}") from None
    return Program(loaded, result.image.source, result.seconds, result.origin)


def pin_dir_of(cflags: list[str]) -> str | None:
    for f in cflags:
        if f.startswith("-DPIN_DIR="):
            return f.split("=", 1)[1].strip('"')
    return None


def compile_program(source: Path, cflags: list[str], kernel_source: str | None,
                    store: ImageStore | None = None) -> Program:
    """Compile (in a child) and load; KernelError with the compiler's or loader's message on failure."""
    if store is not None:
        result = store.get(source, cflags, kernel_source)
    else:
        t0 = time.monotonic()
        result = CompileResult(run_compiler(source, cflags, kernel_source), 0.0, "compiled")
        result.seconds = time.monotonic() - t0
    return load_program(result, pin_dir_of(cflags))


def attach(prog: Program, pid: int, attach_fn: Callable[[Any, int], Any]) -> Any:
    """Run a probe module's attach(bpf, pid) and remember the uprobes it created for this pid, even
    when it fails half-way (so that they can be detached). Load/verifier errors become KernelError."""
    before = set(prog.bpf.uprobe_fds)
    try:
        return attach_fn(prog.bpf, pid)
    except Exception as e:
        from .probes.spec import ProbeUnavailable  # here: the probe packages import this module

        if isinstance(e, ProbeUnavailable | KernelError):
            raise
        raise KernelError(f"attaching {prog.source} failed: {str(e).strip().splitlines()[-1] if str(e) else e!r}") \
            from None
    finally:
        new = [k for k in prog.bpf.uprobe_fds if k not in before]
        if new:
            prog.links.setdefault(pid, []).extend(new)


def detach_pid(prog: Program, pid: int) -> int:
    """Close this pid's uprobe perf events (closing the fd detaches)."""
    keys = prog.links.pop(pid, [])
    for key in keys:
        prog.bpf.detach(key)
    return len(keys)


def close_program(prog: Program) -> None:
    """Detach every pid, then free maps, programs and the ring buffer."""
    for pid in list(prog.links):
        detach_pid(prog, pid)
    prog.bpf.close()


def release_bpf(bpf: Any) -> None:
    """Close every uprobe of a BCC object, then free it. BCC's own cleanup() also edits tracefs
    uprobe_events, which its PMU attach never used and which may not be mounted (it then raises)."""
    from bcc import lib
    for ev_name, fd in list(bpf.uprobe_fds.items()):
        lib.bpf_close_perf_event_fd(fd)
        bpf._del_uprobe_fd(ev_name)
    bpf.cleanup()
