"""``python -m visionpeft.edge apply base.onnx crops.vpatch -o crops.onnx``: see ``visionpeft.edge.apply``."""

import sys

from .apply import main

sys.exit(main())
