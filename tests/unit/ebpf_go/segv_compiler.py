"""Stands in for receiver.ebpf_go.bpfcompile in a test: writes a diagnostic, then crashes as BCC
does on some compile errors (SIGSEGV)."""

import os
import signal
import sys

if __name__ == "__main__":
    sys.stdin.read()
    sys.stderr.write("LLVM ERROR: something went very wrong\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSEGV)
