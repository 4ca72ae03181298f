"""One model call at a time, clicks first: how a server shares its CPU among many people.

With many people on one server, each request's torch call would otherwise run at once with the
others' (each asking for every core), and a click's decoder call (tens of milliseconds) would
wait behind other people's image embeddings (hundreds). A :class:`ComputeLane` runs the model
calls one at a time, by priority (clicks before embeddings; first come, first served within a
priority), and an embedding steps aside between encoder blocks whenever a click is waiting
(:meth:`ComputeLane.attach` hooks the encoder's blocks), so a click waits for at most one
block, not for a whole embedding.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

#: priority of a click's prompt encoder + mask decoder call
CLICK = 0
#: priority of an image embedding or a generator's pre-fill
EMBED = 1


class ComputeLane:
    """A priority lock for model calls (see the module).

    ::

        lane = ComputeLane().attach(model.image_encoder)
        with lane.turn(CLICK):
            predictor.predict(...)
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, ticket)
        self._tickets = itertools.count()
        self._holder: int | None = None  # thread id of the call that runs
        self._held: tuple[int, int] | None = None  # its (priority, ticket)
        self._hooks: list = []

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` put on an encoder (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def attach(self, encoder: nn.Module) -> ComputeLane:
        """Let a low-priority call step aside before each of ``encoder``'s blocks (its
        ``blocks`` list, as SAM's ViT has) while a higher-priority call waits."""
        for block in getattr(encoder, "blocks", []):
            hook = block.register_forward_pre_hook(lambda _module, _inputs: self.step_aside())
            self._hooks.append(hook)
        return self

    @contextmanager
    def turn(self, priority: int) -> Iterator[None]:
        """Run the ``with`` body when it is this call's turn (re-entrant in one thread: a call
        inside a turn runs in it)."""
        me = threading.get_ident()
        with self._condition:
            if self._holder == me:
                nested = True
            else:
                nested = False
                self._wait_for((priority, next(self._tickets)))
        try:
            yield
        finally:
            if not nested:
                with self._condition:
                    self._holder = self._held = None
                    self._condition.notify_all()

    def step_aside(self) -> None:
        """Called by the running call between pieces of its work: when a call of higher
        priority waits, let it run first, then go on (keeping this call's place in line)."""
        me = threading.get_ident()
        with self._condition:
            if self._holder != me or self._held is None:
                return
            if not self._waiting or self._waiting[0][0] >= self._held[0]:
                return
            held = self._held
            self._holder = self._held = None
            self._condition.notify_all()
            self._wait_for(held)

    def _wait_for(self, entry: tuple[int, int]) -> None:
        """Queue ``entry`` and wait until it is first and the lane is free (lock held)."""
        heapq.heappush(self._waiting, entry)
        while self._holder is not None or self._waiting[0] != entry:
            self._condition.wait()
        heapq.heappop(self._waiting)
        self._holder, self._held = threading.get_ident(), entry
