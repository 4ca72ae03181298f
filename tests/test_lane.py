"""The annotation server's compute lane: one model call at a time, clicks first, and an
embedding that steps aside between encoder blocks while a click waits."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from maskmill.engine.web.lane import CLICK, EMBED, ComputeLane


class _Block(nn.Module):
    def __init__(self, index: int, log: list, seconds: float) -> None:
        super().__init__()
        self.index, self.log, self.seconds = index, log, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(f"block{self.index}")
        time.sleep(self.seconds)
        return x


class _Encoder(nn.Module):
    def __init__(self, log: list, seconds: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(i, log, s) for i, s in enumerate(seconds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_click_runs_between_encoder_blocks_of_an_embedding():
    log: list[str] = []
    encoder = _Encoder(log, [0.5, 0.01, 0.01, 0.01])
    lane = ComputeLane().attach(encoder)

    def embed() -> None:
        with lane.turn(EMBED):
            encoder(torch.zeros(1))
            log.append("embedded")

    def click() -> None:
        with lane.turn(CLICK):
            log.append("click")

    embedding = _thread(embed)
    while "block0" not in log:
        time.sleep(0.001)
    clicking = _thread(click)  # queued while block 0 runs
    embedding.join(10)
    clicking.join(10)
    assert log == ["block0", "click", "block1", "block2", "block3", "embedded"]


def test_waiting_clicks_go_before_waiting_embeddings_and_fifo_within_a_priority():
    log: list[str] = []
    lane = ComputeLane()
    release = threading.Event()

    def holder() -> None:
        with lane.turn(EMBED):
            log.append("holder")
            release.wait(10)

    def call(name: str, priority: int):
        def run() -> None:
            with lane.turn(priority):
                log.append(name)

        return run

    first = _thread(holder)
    while not log:
        time.sleep(0.001)
    threads = []
    for name, priority in (("embed-a", EMBED), ("click-a", CLICK), ("embed-b", EMBED)):
        threads.append(_thread(call(name, priority)))
        time.sleep(0.05)  # queued in this order
    threads.append(_thread(call("click-b", CLICK)))
    time.sleep(0.05)
    release.set()
    for thread in [first, *threads]:
        thread.join(10)
    assert log == ["holder", "click-a", "click-b", "embed-a", "embed-b"]


def test_a_turn_inside_a_turn_runs_in_it_and_the_lane_is_free_after():
    lane = ComputeLane()
    with lane.turn(EMBED), lane.turn(CLICK):
        pass
    done = threading.Event()
    thread = _thread(lambda: (lane.turn(CLICK).__enter__(), done.set()))
    thread.join(5)
    assert done.is_set()


def test_detach_removes_the_hooks():
    log: list[str] = []
    encoder = _Encoder(log, [0.0, 0.0])
    lane = ComputeLane().attach(encoder)
    assert all(len(block._forward_pre_hooks) == 1 for block in encoder.blocks)
    lane.detach()
    assert all(len(block._forward_pre_hooks) == 0 for block in encoder.blocks)
