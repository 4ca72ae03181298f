"""Per-click latency of the annotation page (``maskmill serve``): what a person waits for after
each click, against the bare ``Predictor.predict`` call (the reference) measured in the same run.

    python bench/serve.py                         # 640x480 scene, the shipped model
    python bench/serve.py --checkpoint model.pt --clicks 40 --threads 2

Printed, for a first click (three ambiguous masks) and a refining click (one mask, the previous
logits fed back): milliseconds per click, median and p90, of

- ``predictor``: ``Predictor.predict`` on the embedded image (prompt encoder, mask decoder,
  upsampling to the image) — the reference;
- ``session``: ``AnnotationSession.predict`` (adds validation and the masks' run-length
  encoding for the page);
- ``http``: ``POST /api/images/{id}/predict`` through the Starlette app in-process (adds JSON);

and the ratio of each to the reference. Goal: ``http`` <= 100 ms per click with the default
model. The image embedding is computed once, when the image is opened (printed too).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from maskmill.engine.training.synthetic import write_coco
from maskmill.engine.web.app import create_app
from maskmill.engine.web.session import AnnotationSession
from maskmill.model import build_model, load_model
from maskmill.storage import import_coco

with warnings.catch_warnings():  # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def _ms(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1000
    return float(np.median(values)), float(np.percentile(values, 90))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model file (default: the shipped model)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks per measurement (30)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model, name = load_model(args.checkpoint)
    except FileNotFoundError:
        model, name = build_model("tiny", seed=0), "random tiny (no default shipped; same cost)"

    work = Path(tempfile.mkdtemp(prefix="maskmill-bench-serve-"))
    annotations = write_coco(work / "scenes", 1, seed=0, height=args.height, width=args.width)
    import_coco(str(annotations), str(work / "scenes" / "images"), str(work / "store"))

    with AnnotationSession(str(work / "store"), 1, "manual", model) as session:
        started = time.perf_counter()
        image_id = session.state()["image"]["image_id"]  # opens the image: the embedding
        embed_s = time.perf_counter() - started
        client = TestClient(create_app(session))
        work = session.workspace()  # the one person's: their predictor and open image
        predictor = work.predictor
        rng = np.random.default_rng(0)
        xs = rng.integers(0, args.width, args.clicks)
        ys = rng.integers(0, args.height, args.clicks)
        url = f"/api/images/{image_id}/predict"
        headers = {"Content-Type": "application/json"}
        results: dict[str, dict[str, list[float]]] = {"first": {}, "refine": {}}
        for kind in ("first", "refine"):
            times = results[kind] = {"predictor": [], "session": [], "http": []}
            for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
                points = (
                    [[x, y, 1]] if kind == "first" else [[x, y, 1], [(x + 37) % args.width, y, 0]]
                )
                refine = kind == "refine"
                # Interleaved, so load from other processes hits all three alike.
                session.predict(image_id, [[x, y, 1]])
                previous = work.open.object.prediction.low_res[:1] if refine else None
                coords = np.asarray([p[:2] for p in points], np.float32)
                labels = np.asarray([p[2] for p in points])
                t = time.perf_counter()
                with torch.inference_mode():
                    predictor.predict(
                        coords, labels, mask_input=previous, multimask_output=not refine
                    )
                times["predictor"].append(time.perf_counter() - t)

                session.predict(image_id, [[x, y, 1]])
                t = time.perf_counter()
                session.predict(image_id, points, mask_input_from_previous=refine)
                times["session"].append(time.perf_counter() - t)

                session.predict(image_id, [[x, y, 1]])
                body = json.dumps({"points": points, "mask_input_from_previous": refine})
                t = time.perf_counter()
                response = client.post(url, content=body, headers=headers)
                times["http"].append(time.perf_counter() - t)
                assert response.status_code == 200, response.text

    print(
        f"model: {name}; image {args.width}x{args.height}; torch threads {torch.get_num_threads()}"
    )
    print(f"image embedding (once per image): {embed_s * 1000:.0f} ms")
    print(f"{'click':<8}{'path':<11}{'median ms':>10}{'p90 ms':>9}{'x predictor':>13}")
    for kind, times in results.items():
        reference = _ms(times["predictor"])[0]
        for path, samples in times.items():
            median, p90 = _ms(samples)
            print(f"{kind:<8}{path:<11}{median:>10.1f}{p90:>9.1f}{median / reference:>12.2f}x")
    worst = max(_ms(t["http"])[0] for t in results.values())
    print(
        f"goal: http <= 100 ms per click: {'met' if worst <= 100 else 'NOT met'} ({worst:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
