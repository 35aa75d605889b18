"""User-facing errors: one type per kind of user mistake, each carrying the line the user reads.

Anything raised that is not a UserError is our own bug and may show a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; str(err) is the whole message, one line."""


class ConfigError(UserError):
    """The configuration is invalid. The CLI prints it and exits 2."""


class PrivilegeError(UserError):
    """Missing root or capabilities."""


class KernelError(UserError):
    """The kernel or BPF tooling cannot do what is asked (no BCC, no headers, verifier refusal)."""


class ConsumerError(Exception):
    """Raised by consume() when data is refused. permanent=False means the sender may retry."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
