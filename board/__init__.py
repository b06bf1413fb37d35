"""An emulated Raspberry Pi OS base for the device side: Debian bookworm arm64 (what Raspberry Pi OS
Bookworm is built on) made with debootstrap, run under qemu-user-static through binfmt_misc, with
Debian's Python 3.11, the README's device install in a venv and its own sshd on 127.0.0.1.

    host.py      root, Debian's qemu-user-static/debootstrap, binfmt_misc (undone afterwards)
    root.py      the cached root and its venvs (~/.cache/edgeslim/board); THE device install command
    emulated.py  the board running: its sshd with keys made for the run, stopped by its pid
    check.py     what `make test-board` checks: remote, outputs vs the host, bad input vs x86-64
    __main__.py  python -m board {test,try}

Not part of the installed package: it is run from the checkout (`make test-board`, `make board-try`).
Latency measured here is the emulator's: reports say `emulated` and `report` labels them so.
"""
