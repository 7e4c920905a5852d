"""Where the checkout is: the harness runs from a source checkout (it is never installed in an image)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT_SOURCES = REPO / "operator"
TOOLS_SOURCES = REPO / "tools"
CHART = REPO / "charts" / "lorafleet"
CRDS = REPO / "crds"
IMAGES_DIR = REPO / "images"
