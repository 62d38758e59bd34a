"""fmnist-accel: Fashion-MNIST training through Hugging Face Accelerate."""

__version__ = "0.1.0"

# A process of a restarted launch whose earlier attempt ended on purpose (bad input, a stop
# signal...) exits here, before anything heavy is imported: see cluster/restarts.py.
from .cluster import restarts as _restarts  # noqa: E402

_restarts.exit_if_an_earlier_attempt_chose_to()
