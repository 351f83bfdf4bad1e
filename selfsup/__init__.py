"""selfsup: self-supervised pretraining of vision models on Ray, from data in object storage."""

import os

# A run on a small node starts several times its CPU count in Ray worker processes as a matter of
# course (workers, Ray Data tasks, checkpoint uploads, trial drivers), and the raylet then warns on
# the driver's console about "PYTHON worker processes". Ray's documented filter for driver output
# is read when Ray is imported, hence here, before any of it; a user's own filter is kept.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "PYTHON worker processes have been started")
