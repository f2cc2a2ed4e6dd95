"""The frozen teacher kinds (teacher.kind): "none", or a loader in models/teachers.py, which builds exactly these.
A plain list, so config.py checks the key without importing the teachers (they import config.py)."""

TEACHER_KINDS = ("none", "open_clip", "timm")
