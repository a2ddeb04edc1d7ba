"""``python -m visionpeft.edge apply|info|switch ...``: see ``visionpeft.edge.apply`` and ``visionpeft.edge.fleet``."""

import sys

if sys.argv[1:2] == ["switch"]:  # onnxruntime is needed only here: apply/info stay numpy + onnx
    from .fleet import main

    sys.exit(main(sys.argv[2:]))
from .apply import main

sys.exit(main())
