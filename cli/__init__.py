"""Command line: typer + rich. Parses options, builds configs, calls library code."""

import os

# OpenCV's and ffmpeg's own warnings ("moov atom not found", "[ WARN:0@...]") would stand beside
# the one-line error the command prints for a broken video; quiet them unless the user set a level.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
