"""``python -m peft_ipt.cli``: the `peft-ipt` command, for launchers that run a module (``accelerate launch -m``)
rather than a script."""

import sys

from . import main

sys.exit(main())
