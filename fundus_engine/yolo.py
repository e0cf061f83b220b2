"""The one place ultralytics is imported: it must never reach the network, so its offline
switches are set before the import, its settings sync is turned off, and the fonts its dataset
checks and plots look for are provided from matplotlib's bundled DejaVu Sans (otherwise
`check_font` probes GitHub for Arial.ttf even offline)."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path


@functools.cache
def ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    import matplotlib
    import ultralytics as ul
    from ultralytics.utils import USER_CONFIG_DIR

    ul.settings.update({"sync": False})
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundled, target)
    return ul
