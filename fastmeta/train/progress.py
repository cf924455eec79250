"""Progress bar (tqdm, periodic prints or nothing) and log lines of the trainer, on stderr."""
from __future__ import annotations

import sys
import time


class _Progress:
    def __init__(self, mode: str, total: int, desc: str, initial: int, enabled: bool):
        self.mode = "none" if not enabled else mode
        self.bar = None
        self.total = total
        self.desc = desc
        self.last_print = 0.0
        if self.mode in ("auto", "tqdm"):
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
                self.mode = "tqdm"
            except ImportError:
                if self.mode == "tqdm":
                    raise
                self.mode = "print"

    def update(self, step: int, info: dict) -> None:
        if self.mode == "tqdm":
            self.bar.update(1)
            self.bar.set_postfix(info, refresh=False)
        elif self.mode == "print":
            now = time.time()
            if now - self.last_print > 10 or step == self.total:
                self.last_print = now
                items = " ".join(f"{k}={v}" for k, v in info.items())
                print(f"[{self.desc}] step {step}/{self.total} {items}", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.mode == "tqdm":
            self.bar.write(message, file=sys.stderr)
        elif self.mode != "none":
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
