"""absl entry points: `python -m experiments.NAME --help` lists the flags."""

import os

# Hide TensorFlow's C++ start-up INFO lines (CPU features, oneDNN); its
# warnings and errors still print. Setting the variable yourself wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
