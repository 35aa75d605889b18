"""What a process has mapped: used to prove the collector never loads BCC or LLVM itself."""

from __future__ import annotations

import os
import re
from pathlib import Path


def bcc_or_llvm_mapped(pid: int | str = "self") -> list[str]:
    """Mapped files of BCC, LLVM or clang (the path only: an address like 7f3bcc000000 is not BCC)."""
    paths = {line.split()[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if len(line.split()) >= 6}
    return sorted(p for p in paths if re.search(r"bcc|llvm|clang", os.path.basename(p), re.I))
