"""Using fastdpo inside TRL: ``from fastdpo.trl import DPOTrainer`` instead of
``from trl import DPOTrainer``, nothing else changed.

Needs TRL 1.16 (``pip install fastdpo[trl]``). See fastdpo/trl/trainer.py for what is
overridden, fastdpo/trl/lm_head.py for the head.
"""

import warnings

try:
    import trl
    from packaging.version import Version
except ImportError as error:
    raise ImportError(
        "fastdpo.trl needs TRL 1.16, an optional dependency: pip install fastdpo[trl]"
    ) from error

if Version(trl.__version__) < Version("1.16"):
    raise ImportError(
        f"fastdpo.trl needs TRL 1.16 (its fused LM head), found TRL {trl.__version__}: pip install fastdpo[trl]"
    )
if Version(trl.__version__) >= Version("1.17"):
    warnings.warn(
        f"fastdpo.trl is built and tested for TRL 1.16, found TRL {trl.__version__}; "
        "pip install fastdpo[trl] installs the tested version",
        stacklevel=2,
    )

from fastdpo.trl.lm_head import add_fastdpo_lm_head  # noqa: E402
from fastdpo.trl.trainer import DPOTrainer  # noqa: E402

__all__ = ["DPOTrainer", "add_fastdpo_lm_head"]
