"""Compiling one BPF C file: `run_compiler` runs bpfcompile.py as a child process (JSON request on
stdin, the program image on stdout) and turns its answer into a `ProgramImage`, or a KernelError
with clang's first error line, a crash of BCC included: the collector process never runs BCC.

The child pins into a temporary bpffs directory removed here whatever happens to it. A child that
runs is in the caller's `running` set, so that a shutdown can kill it (images.ImageStore does).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from collector.errors import KernelError
from collector.telemetry import LOG_NAME

from . import hostfs
from .bpfcompile import ProgramImage, remove_pin_dir
from .preflight import check_bcc

BPF_DIR = Path(__file__).resolve().parent / "bpf"   # the headers every program includes (-I)
COMPILER_LOG = logging.getLogger(f"{LOG_NAME}.receiver.ebpf_go.compiler")

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
