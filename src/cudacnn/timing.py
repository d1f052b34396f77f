"""The one device timer: CUDA events on a GPU, the host clock elsewhere.

Marks are queued without waiting on the device; elapsed times are read once, at the end, so timing a
training run or a layer adds no synchronization to what it times."""

from __future__ import annotations

import time

import torch


class DeviceTimer:
    """`mark()` returns a point in device time; `elapsed_ms(a, b)` reads the time between two marks.
    `start()`/`stop()` pairs collect spans, read together by `span_seconds()`; `with timer:` times one span."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: list[list] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        end.synchronize()
        return start.elapsed_time(end)

    def start(self) -> None:
        self.spans.append([self.mark(), None])

    def stop(self) -> None:
        self.spans[-1][1] = self.mark()

    def span_seconds(self) -> list[float]:
        return [self.elapsed_ms(a, b) / 1e3 for a, b in self.spans]

    @property
    def ms(self) -> float:
        """The last span, in milliseconds."""
        return self.elapsed_ms(*self.spans[-1])

    def __enter__(self) -> "DeviceTimer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
