#!/usr/bin/env python
"""Train adapters from a config: ``python scripts/train.py --cfg crops.yaml [key=value ...]``.

Same as the ``visionpeft-train`` command; see ``--help`` and visionpeft.train.config for the config format.
"""

from visionpeft.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
