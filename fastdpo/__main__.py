"""``python -m fastdpo`` (and ``torchrun -m fastdpo``) run the ``fastdpo`` command."""

import sys

from fastdpo.train.cli import main

sys.exit(main())
