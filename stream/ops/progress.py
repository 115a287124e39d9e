"""A terminal progress bar with rate and ETA. Pure formatting."""

from __future__ import annotations


def progress_line(done: int, total: int | None, seconds: float, *, width: int = 30) -> str:
    """`[#####.....] 120/300 40% 35.2/s ETA 5s`; an unknown total shows no bar."""
    rate = done / seconds if seconds > 0 else 0.0
    if not total:
        return f"{done} done, {rate:.1f}/s, total unknown"
    share = min(done / total, 1.0)
    filled = int(share * width)
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {done}/{total} {share:4.0%} {rate:.1f}/s {_eta(done, total, rate)}"


def _eta(done: int, total: int, rate: float) -> str:
    if done >= total:
        return "done"
    return f"ETA {(total - done) / rate:.0f}s" if rate > 0 else "ETA ?"
