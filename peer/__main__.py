"""``python -m peer``: see `peer.cli`."""

import sys

from peer.cli import main

sys.exit(main())
