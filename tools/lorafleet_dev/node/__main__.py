"""``python -m lorafleet_dev.node`` (``hack/node``): see the package docstring."""

import sys

from lorafleet_dev.node.lifecycle import main

sys.exit(main())
