"""Take the README's screenshot of review mode (``docs/review_page.png``) in headless Chromium.

    .venv/bin/python docs/review_screenshot.py [--out docs/review_page.png]

A store of two generated scenes (ground truth imported), with round 1 (manual) as alice left it:
four masks on the first image, one of them two objects at once. bob opens ``/review``, approves
the first two masks, rejects the merged one with a reason and paints an eraser stroke on it;
the page is captured before he submits. Needs ``/usr/bin/chromium`` and playwright (the test
extras), as ``tests/test_review.py`` does.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn
from playwright.sync_api import sync_playwright

from maskmill.engine.evaluate import interior_point
from maskmill.engine.training.synthetic import write_coco
from maskmill.engine.web.app import create_app
from maskmill.engine.web.session import AnnotationSession, WebAnnotator
from maskmill.model import build_model
from maskmill.storage import StageWriter, Store, import_coco, rle
from maskmill.storage.queries import ground_truth

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"


def make_store(folder: Path) -> tuple[Store, str]:
    """The store, and the id of the image alice annotated."""
    annotations = write_coco(folder, 2, seed=4, height=360, width=480, parts=False)
    store = Store(str(folder / "store"))
    import_coco(str(annotations), str(folder / "images"), store)
    truth = ground_truth(store)
    image_id = sorted(truth)[0]
    objects = sorted(truth[image_id], key=lambda o: -int(rle.areas([o])[0]))
    merged = rle.encode(rle.decode(objects[2]) | rle.decode(objects[3]))
    records = [
        {"image_id": image_id, "segmentation": s, "source": "web:alice", "index": i}
        | {"clicks": [[10.0, 10.0, 1]] * (i + 1), "seconds": 3.0 + i}
        for i, s in enumerate([objects[0], objects[1], merged, objects[4]])
    ]
    with StageWriter(store, 1, "manual") as writer:
        writer.write_masks(image_id, records, model_version=1)
    return store, image_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "review_page.png"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store, image_id = make_store(Path(tmp))
        model = build_model("tiny", seed=0)  # review prompts no model
        with AnnotationSession(store, 1, "manual", model, 1, WebAnnotator("bob")) as session:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            config = uvicorn.Config(
                create_app(session), host="127.0.0.1", port=port, log_level="warning"
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                time.sleep(0.05)
            try:
                shoot(f"http://127.0.0.1:{port}", store, image_id, args.out)
            finally:
                server.should_exit = True
                thread.join(timeout=30)
    print(f"wrote {args.out}")
    return 0


def shoot(base: str, store: Store, image_id: str, out: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 860, "height": 560}, device_scale_factor=1)
        page.goto(f"{base}/review")
        page.wait_for_selector('body[data-state="ready"]', timeout=60_000)
        for index in (0, 1):
            page.click(f'#masks li[data-index="{index}"] button[data-verdict="approved"]')
        page.click('#masks li[data-index="2"] button[data-verdict="rejected"]')
        page.fill('#masks li[data-index="2"] input.reason', "two objects in one mask")
        # An eraser stroke across the smaller of the two objects (the correction in progress).
        smaller = sorted(ground_truth(store)[image_id], key=lambda o: -int(rle.areas([o])[0]))[3]
        x, y = (int(v) for v in interior_point(rle.decode(smaller)))
        page.click("#tool-eraser")
        points = [(x - 12 + 4 * k, y + int(3 * np.sin(k))) for k in range(7)]
        client = [page.evaluate("p => window.maskmill.toClient(p[0], p[1])", p) for p in points]
        page.mouse.move(*client[0])
        page.mouse.down()
        for point in client[1:]:
            page.mouse.move(*point)
        page.mouse.up()
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    raise SystemExit(main())
