"""The one place ultralytics is imported: it must never reach the network, so its offline
switches are set before the import and its settings sync is turned off."""
from __future__ import annotations

import functools
import os


@functools.cache
def ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    import ultralytics as ul

    ul.settings.update({"sync": False})
    return ul
