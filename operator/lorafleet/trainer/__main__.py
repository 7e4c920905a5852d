"""`python -m lorafleet.trainer --config FILE`."""

import sys

from lorafleet.trainer.main import main

sys.exit(main())
