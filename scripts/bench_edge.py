#!/usr/bin/env python
"""Edge benchmark (issue 16): ``python scripts/bench_edge.py --run runs/detect/crops``; see visionpeft/bench/edge.py."""

from visionpeft.bench.edge import main

if __name__ == "__main__":
    raise SystemExit(main())
