#!/usr/bin/env python
"""Per-class confidence on true objects and on background: ``python scripts/class_scores.py RUN [RUN ...]``; see
visionpeft/bench/class_scores.py."""

from visionpeft.bench.class_scores import main

if __name__ == "__main__":
    raise SystemExit(main())
